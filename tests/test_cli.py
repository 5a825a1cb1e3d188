import csv

import pytest
import yaml

from anystep.cli import main
from anystep.config import resolve

GMM_TINY = ["world.name=gmm", "model.hidden=32", "model.depth=1", "train.batch_size=16", "train.steps=3",
            "train.log_every=1", "optim.warmup_steps=1"]
SHAPES_TINY = ["model.patch=[1,4,4]", "model.heads=2", "model.head_dim=8", "model.layers=1", "model.ffn_dim=16",
               "train.batch_size=4", "train.steps=2", "train.log_every=1", "optim.warmup_steps=1"]


def test_help_is_there_for_every_command(capsys):
    for argv in (["--help"], ["demo", "--help"], ["stage1", "--help"], ["sweep", "--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "any-step" in out and "dotted config overrides" in out and "shapes_stage1" in out


def test_dry_run_prints_the_resolved_config_with_overrides(capsys):
    assert main(["stage1", "--dry-run", "train.steps=7", "stage1.derivative=jvp", "optim.lr=1e-3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 7 and cfg["stage1"]["derivative"] == "jvp" and cfg["optim"]["lr"] == 1e-3
    # paper defaults survive in the resolved config
    assert cfg["stage1"]["fuse_guidance_scale"] == 3.0 and cfg["stage1"]["epsilon"] == 5.0
    assert cfg["stage1"]["diffusion_ratio"] == 0.5 and cfg["model"]["gate_value"] == 0.25


def test_paper_defaults_without_a_preset():
    cfg = resolve(None, [])
    assert cfg.optim.lr == 5e-5 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.warmup_steps == 1000
    assert cfg.optim.ema_decay == 0.999 and cfg.train.steps == 6000 and cfg.stage1.weight_type == "beta08"


@pytest.mark.parametrize("argv, message", [
    (["stage1", "--dry-run", "stage1.derivate=jvp"], "unknown config key 'stage1.derivate'"),
    (["stage1", "--dry-run", "train.steps=many"], "needs an integer"),
    (["stage1", "--dry-run", "stage1.derivative=forward"], "stage1.derivative must be one of"),
    (["stage1", "--config", "nosuchpreset", "--dry-run"], "unknown preset"),
    (["teacher", "--config", "shapes_stage1", "--dry-run"], "use `anystep stage1`"),
    (["sample", "/no/such/run"], "checkpoint not found"),
])
def test_bad_input_exits_2_with_a_message_naming_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_step_lists_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "x", "--steps", "0,2"])
    assert ">= 1" in capsys.readouterr().err


def test_gmm_teacher_stage1_sample_sweep_end_to_end(tmp_path, capsys):
    t, s = tmp_path / "teacher", tmp_path / "student"
    assert main(["teacher", "--config", "gmm_teacher", "--no-progress", f"train.out_dir={t}", *GMM_TINY]) == 0
    # --resume is a flag: the overrides after it stay overrides
    assert main(["teacher", "--config", "gmm_teacher", "--no-progress", "--resume", f"train.out_dir={t}",
                 *GMM_TINY, "train.steps=4"]) == 0
    assert (t / "checkpoints" / "step_000004").is_dir()
    assert main(["stage1", "--config", "gmm_stage1", "--no-progress", f"train.out_dir={s}",
                 f"model.init={t}", *GMM_TINY]) == 0
    assert main(["sample", str(s), "--steps", "2", "--out", str(tmp_path / "smp")]) == 0
    assert (tmp_path / "smp.png").is_file()
    assert main(["sweep", str(s), "--steps", "1,2", "--num-samples", "64", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(s / "sweep" / "sweep.csv")))
    assert [(r["sampler"], r["N"]) for r in rows] == [("student", "1"), ("student", "2"),
                                                      ("teacher (exact) Euler", "1"), ("teacher (exact) Euler", "2")]
    assert {"fd", "mode_kl", "precision", "endpoint_error"} <= set(rows[0])
    assert (s / "sweep" / "sweep.png").is_file() and (s / "sweep" / "grid.png").is_file()
    assert "| student | 1 |" in capsys.readouterr().out


def test_shapes_teacher_stage1_sample_sweep_end_to_end(tmp_path):
    t, s = tmp_path / "teacher", tmp_path / "student"
    assert main(["teacher", "--no-progress", f"train.out_dir={t}", *SHAPES_TINY]) == 0
    assert main(["stage1", "--no-progress", f"train.out_dir={s}", f"model.init={t}", *SHAPES_TINY]) == 0
    assert main(["sample", str(s), "--steps", "1", "--num", "2", "--prompt", "a red disk moving left",
                 "--out", str(tmp_path / "clip")]) == 0
    for ext in (".mp4", ".gif", ".png"):
        assert (tmp_path / f"clip{ext}").stat().st_size > 0
    assert main(["sweep", str(s), "--steps", "1,2", "--num-samples", "4", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(s / "sweep" / "sweep.csv")))
    assert {r["sampler"] for r in rows} == {"student", "teacher Euler"}
    assert {"total", "quality", "semantic"} <= set(rows[0])
    assert (s / "sweep" / "grid.mp4").stat().st_size > 0
    assert main(["sample", str(s), "--prompt", "a purple blob moving sideways"]) == 2
