import csv

import pytest
import torch
import yaml

from anystep.cli import main
from anystep.config import resolve

GMM_TINY = ["world.name=gmm", "train.batch_size=16", "train.steps=3", "train.log_every=1"]
SHAPES_TINY = ["train.batch_size=4", "train.steps=2", "train.log_every=1"]
GMM_NET = ["model.network.hidden=32", "model.network.depth=1", "optim.teacher.warmup_steps=1"]   # a fresh teacher
SHAPES_NET = ["model.network.heads=2", "model.network.head_dim=8", "model.network.layers=1",
              "model.network.ffn_dim=16", "optim.teacher.warmup_steps=1"]
WARM = ["optim.student.warmup_steps=1"]      # a Stage-1 or consistency student


def _rows(path):
    """A sweep's CSV table as a list of dicts (the file closed again)."""
    with open(path) as f:
        return list(csv.DictReader(f))


def test_help_is_there_for_every_command(capsys):
    for argv in (["--help"], ["demo", "--help"], ["stage1", "--help"], ["sweep", "--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "any-step" in out and "dotted config overrides" in out and "shapes_stage1" in out


def test_dry_run_prints_the_resolved_config_with_overrides(capsys):
    assert main(["stage1", "--dry-run", "train.steps=7", "stage1.derivative=jvp", "optim.student.lr=1e-3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 7 and cfg["stage1"]["derivative"] == "jvp"
    assert cfg["optim"]["student"]["lr"] == 1e-3
    # paper defaults survive in the resolved config
    assert cfg["stage1"]["fuse_guidance_scale"] == 3.0 and cfg["stage1"]["epsilon"] == 5.0
    assert cfg["stage1"]["diffusion_ratio"] == 0.5 and cfg["model"]["gate_value"] == 0.25


def test_paper_defaults_without_a_preset():
    cfg = resolve(None, [])
    o = cfg.optim["student"]
    assert o.lr == 5e-5 and o.betas == (0.9, 0.95) and o.warmup_steps == 1000 and list(cfg.optim) == ["student"]
    assert cfg.ema.decay == 0.999 and cfg.train.steps == 6000 and cfg.stage1.weight_type == "beta08"
    s2 = resolve(None, ["kind=stage2"])
    assert {r: (o.lr, o.betas, o.warmup_steps) for r, o in s2.optim.items()} == {
        "student": (2e-6, (0.0, 0.999), 0), "critic": (2e-6, (0.0, 0.999), 0)}
    assert (s2.ema.decay, s2.ema.warmup_steps) == (0.99, 200) and s2.stage1.bidirectional_prob == 0.0


@pytest.mark.parametrize("argv, message", [
    (["stage1", "--dry-run", "stage1.derivate=jvp"], "unknown config key 'stage1.derivate'"),
    (["stage1", "--dry-run", "train.steps=many"], "needs an integer"),
    (["stage2", "--dry-run", "stage2.rollout_steps=[1,2"], "the value is not valid YAML"),
    (["stage1", "--dry-run", "stage1.derivative=forward"], "stage1.derivative must be one of"),
    (["stage1", "--dry-run", "stage2.rollout_grad=one"], "a 'stage1' run has no section 'stage2'"),
    (["stage2", "--dry-run", "optim.teacher.lr=1e-3"], "optim.teacher: a 'stage2' run trains"),
    (["stage1", "--dry-run", "world.gmm.seed=1"], "world.gmm is not a section of the 'shapes' world"),
    (["teacher", "--dry-run", "model.causal.chunk_partition=[1,2]"], "model.causal is for Stage-1 and Stage-2"),
    (["stage1", "--config", "nosuchpreset", "--dry-run"], "unknown preset"),
    (["teacher", "--config", "shapes_stage1", "--dry-run"], "use `anystep stage1`"),
    (["sample", "/no/such/run"], "checkpoint not found"),
    (["teacher", "--dry-run", "world.name=gmm"], "the preset 'shapes_teacher' is written for the 'shapes' world"),
    (["stage1", "--config", "gmm_stage1", "--dry-run", "model.lora_rank=4"], "the 'gmm' world's 'mlp' network"),
])
def test_bad_input_exits_2_with_a_message_naming_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_kind_is_a_command_from_its_table_entry_alone(monkeypatch, capsys):
    """A kind added to the table (here a renamed teacher kind without a preset) is a command with --help, its
    config defaults and its sections, and no other code knows its name."""
    from dataclasses import replace

    from anystep.kinds import KINDS, kind

    monkeypatch.setitem(KINDS, "velocity", replace(kind("teacher"), name="velocity", preset=None))
    with pytest.raises(SystemExit):
        main(["velocity", "--help"])
    assert "(default: the config defaults)" in " ".join(capsys.readouterr().out.split())
    assert main(["velocity", "--dry-run", "world.name=gmm", "teacher.shift=2"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["kind"] == "velocity" and cfg["teacher"]["shift"] == 2.0 and list(cfg["optim"]) == ["teacher"]


@pytest.mark.parametrize("argv", [
    ["stage1", "--config", "gmm_stage1", "--no-progress", "train.steps=10"],       # issue 16's command
    ["stage1", "train.steps=10", "--config", "gmm_stage1", "--no-progress"],
    ["stage1", "--no-progress", "train.steps=3", "--config", "gmm_stage1", "train.steps=10"],
    ["stage1", "--config=gmm_stage1", "train.seed=4", "--resume-from", "somewhere", "train.steps=10", "--no-progress"],
])
def test_overrides_stand_anywhere_in_order(argv):
    from anystep.cli import parse

    args = parse(argv)
    assert (args.command, args.config, args.no_progress) == ("stage1", "gmm_stage1", True)
    assert args.overrides[-1] == "train.steps=10"        # the last of a repeated key wins: order is kept
    assert resolve(args.config, args.overrides).train.steps == 10


def test_overrides_anywhere_reach_the_config(capsys):
    assert main(["stage1", "--config", "gmm_stage1", "train.seed=4", "--dry-run", "train.steps=10",
                 "--no-progress", "optim.student.lr=1e-3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["train"]["seed"], cfg["train"]["steps"], cfg["optim"]["student"]["lr"]) == (4, 10, 1e-3)
    assert main(["demo", "--dry-run", "train.threads=1", "--budget", "5,4,3,2", "--no-baselines",
                 "train.seed=7"]) == 0
    docs = [yaml.safe_load(d.split("\n", 1)[1]) for d in capsys.readouterr().out.split("\n# ")]
    assert [(d["train"]["threads"], d["train"]["seed"]) for d in docs] == [(1, 7), (1, 7)]


@pytest.mark.parametrize("argv, bad", [
    (["demo", "--quick", "x=y"], "--quick"),                    # no such flag: refused, not taken as an override
    (["stage1", "--dry-run", "train.steps=3", "--nope"], "--nope"),
    (["sample", "run", "--steps", "2", "train.steps=3"], "train.steps=3"),   # sample takes no overrides
])
def test_unknown_arguments_are_named(argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"unrecognized arguments: {bad}" in err and f"anystep {argv[0]} --help" in err


def test_bad_step_lists_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "x", "--steps", "0,2"])
    assert ">= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_gmm_teacher_stage1_sample_sweep_end_to_end(tmp_path, capsys):
    t, s = tmp_path / "teacher", tmp_path / "student"
    assert main(["teacher", "--config", "gmm_teacher", "--no-progress", f"train.out_dir={t}", *GMM_TINY,
                 *GMM_NET]) == 0
    # overrides may stand anywhere: before, between and after the flags
    assert main(["teacher", "--config", "gmm_teacher", *GMM_TINY, "--no-progress", "--resume", f"train.out_dir={t}",
                 *GMM_NET, "train.steps=4"]) == 0
    assert (t / "checkpoints" / "step_000004").is_dir()
    assert main(["stage1", "--config", "gmm_stage1", "--no-progress", f"train.out_dir={s}",
                 f"model.init={t}", *GMM_TINY, *WARM]) == 0
    assert main(["sample", str(s), "--steps", "2", "--out", str(tmp_path / "new" / "smp")]) == 0   # folder made
    assert (tmp_path / "new" / "smp.png").is_file()
    assert main(["sweep", str(s), "--steps", "1,2", "--num-samples", "64", "--no-progress"]) == 0
    rows = _rows(s / "sweep" / "sweep.csv")
    assert [(r["sampler"], r["N"]) for r in rows] == [("student", "1"), ("student", "2"),
                                                      ("teacher (exact) Euler", "1"), ("teacher (exact) Euler", "2")]
    assert {"fd", "mode_kl", "precision", "endpoint_error"} <= set(rows[0])
    assert (s / "sweep" / "sweep.png").is_file() and (s / "sweep" / "grid.png").is_file()
    assert "| student | 1 |" in capsys.readouterr().out
    # --seed: the run's seed again gives the same table; another seed draws other noises and prompts
    seed = resolve(str(s / "config.yaml")).sweep.seed
    for name, value in (("same", seed), ("other", seed + 1)):
        assert main(["sweep", str(s), "--steps", "1,2", "--num-samples", "64", "--no-progress", "--seed",
                     str(value), "--out", str(tmp_path / name)]) == 0
    fd = {name: [r["fd"] for r in _rows(tmp_path / name / "sweep.csv")] for name in ("same", "other")}
    assert fd["same"] == [r["fd"] for r in rows] and fd["other"] != fd["same"]


@pytest.mark.slow
def test_shapes_teacher_stage1_sample_sweep_end_to_end(tmp_path):
    t, s = tmp_path / "teacher", tmp_path / "student"
    assert main(["teacher", "--no-progress", f"train.out_dir={t}", *SHAPES_TINY, *SHAPES_NET]) == 0
    assert main(["stage1", "--no-progress", f"train.out_dir={s}", f"model.init={t}", *SHAPES_TINY, *WARM]) == 0
    assert main(["sample", str(s), "--steps", "1", "--num", "2", "--prompt", "a red disk moving left",
                 "--out", str(tmp_path / "clip")]) == 0
    for ext in (".mp4", ".gif", ".png"):
        assert (tmp_path / f"clip{ext}").stat().st_size > 0
    assert main(["sweep", str(s), "--steps", "1,2", "--num-samples", "4", "--no-progress"]) == 0
    rows = _rows(s / "sweep" / "sweep.csv")
    assert {r["sampler"] for r in rows} == {"student", "teacher Euler"}
    assert {"total", "quality", "semantic"} <= set(rows[0])
    assert (s / "sweep" / "grid.mp4").stat().st_size > 0
    assert main(["sample", str(s), "--prompt", "a purple blob moving sideways"]) == 2


@pytest.mark.slow
def test_gmm_stage2_and_baselines_end_to_end(tmp_path, capsys):
    """teacher -> Stage 1 -> Stage 2 (exact teacher), teacher -> consistency -> consistency + DMD; one sweep."""
    t, s1, s2, cd, cbs = (tmp_path / n for n in ("teacher", "s1", "s2", "cd", "cbs"))
    stage2_tiny = [*GMM_TINY, "stage2.dmd_batch_size=8", "stage2.rollout_steps=[2,4]"]
    assert main(["teacher", "--config", "gmm_teacher", "--no-progress", f"train.out_dir={t}", *GMM_TINY,
                 *GMM_NET]) == 0
    assert main(["stage1", "--config", "gmm_stage1", "--no-progress", f"train.out_dir={s1}", f"model.init={t}",
                 *GMM_TINY, *WARM]) == 0
    assert main(["stage2", "--config", "gmm_stage2", "--no-progress", f"train.out_dir={s2}",
                 f"model.init={s1}", *stage2_tiny]) == 0
    assert main(["consistency", "--config", "gmm_consistency", "--no-progress", f"train.out_dir={cd}",
                 f"model.init={t}", *GMM_TINY, *WARM]) == 0
    assert main(["cbs", "--config", "gmm_cbs", "--no-progress", f"train.out_dir={cbs}", f"model.init={cd}",
                 *GMM_TINY, "cbs.dmd_batch_size=8", "cbs.rollout_steps=[2,4]"]) == 0
    ckpt = cbs / "checkpoints" / "step_000003"
    assert {p.name for p in ckpt.glob("*.safetensors")} == {"student.safetensors", "student_ema.safetensors",
                                                            "critic.safetensors"}
    capsys.readouterr()
    assert main(["sweep", str(s1), str(s2), str(cd), str(cbs), "--steps", "1,2", "--num-samples", "32",
                 "--no-progress", "--out", str(tmp_path / "sw")]) == 0
    rows = _rows(tmp_path / "sw" / "sweep.csv")
    assert [r["sampler"] for r in rows[::2]] == ["AnyFlow Stage 1 (s1)", "AnyFlow Stage 2 (s2)",
                                                 "consistency distillation (cd)", "consistency + DMD (cbs)",
                                                 "teacher (exact) Euler"]
    # a Stage-2 run needs a Stage-1 student to start from
    assert main(["stage2", "--config", "gmm_stage2", "--no-progress", f"train.out_dir={tmp_path / 'x'}",
                 f"model.init={t}", *stage2_tiny]) == 2
    assert "is a 'teacher' run; a stage2 run starts from a stage1 or stage2 run" in capsys.readouterr().err
    assert main(["stage2", "--config", "gmm_stage2", "--dry-run", "stage2.rollout_grad=backwards"]) == 2


@pytest.mark.slow
def test_shapes_stage2_end_to_end(tmp_path):
    t, s1, s2 = tmp_path / "teacher", tmp_path / "s1", tmp_path / "s2"
    assert main(["teacher", "--no-progress", f"train.out_dir={t}", *SHAPES_TINY, *SHAPES_NET]) == 0
    assert main(["stage1", "--no-progress", f"train.out_dir={s1}", f"model.init={t}", *SHAPES_TINY, *WARM]) == 0
    assert main(["stage2", "--no-progress", f"train.out_dir={s2}", f"model.init={s1}", *SHAPES_TINY,
                 "stage2.dmd_batch_size=2", "stage2.rollout_steps=[2]"]) == 0
    assert main(["sample", str(s2), "--steps", "2", "--num", "2", "--out", str(tmp_path / "clip")]) == 0
    assert (tmp_path / "clip.mp4").stat().st_size > 0


def test_demo_dry_run_resolves_every_stage(capsys):
    assert main(["demo", "--dry-run", "--budget", "5,4,3,2", "train.threads=1"]) == 0
    docs = [yaml.safe_load(d.split("\n", 1)[1]) for d in capsys.readouterr().out.split("\n# ")]
    assert [(d["kind"], d["train"]["steps"], d["train"]["threads"]) for d in docs] == [
        ("stage1", 5, 1), ("stage2", 4, 1), ("consistency", 3, 1), ("cbs", 2, 1)]
    assert docs[1]["model"]["init"] == "runs/demo/stage1" and docs[3]["model"]["init"] == "runs/demo/consistency"
    assert docs[1]["optim"]["student"]["betas"] == [0.0, 0.999] and "stage2" not in docs[3]


@pytest.mark.slow
def test_shapes_lora_roles_on_one_frozen_base_end_to_end(tmp_path):
    """model.lora_rank > 0: Stage 1 trains a student adapter, Stage 2 adds a critic adapter on the same frozen
    base (the teacher), checkpoints hold adapter tensors only, and sampling rebuilds base + adapter."""
    from anystep.recipes import load_model
    from anystep.train.checkpoint import load_tensors

    t, s1, s2 = tmp_path / "teacher", tmp_path / "s1", tmp_path / "s2"
    lora = ["model.lora_rank=4"]
    assert main(["teacher", "--no-progress", f"train.out_dir={t}", *SHAPES_TINY, *SHAPES_NET]) == 0
    assert main(["stage1", "--no-progress", f"train.out_dir={s1}", f"model.init={t}", *SHAPES_TINY, *WARM, *lora]) == 0
    assert main(["stage2", "--no-progress", f"train.out_dir={s2}", f"model.init={s1}", *SHAPES_TINY, *lora,
                 "stage2.dmd_batch_size=2", "stage2.rollout_steps=[2]"]) == 0
    weights = load_tensors(s2 / "checkpoints" / "step_000002" / "student.safetensors")
    assert weights and all("lora_" in k for k in weights)
    critic = load_tensors(s2 / "checkpoints" / "step_000002" / "critic.safetensors")
    assert critic and not any("embedder" in k for k in critic)
    teacher, _, _ = load_model(str(t), role="teacher")
    student, _, _ = load_model(str(s2))
    x, tt = torch.randn(1, 4, 3, 16, 16), torch.tensor([700.0])
    text = torch.randn(1, 8, 32)
    with torch.no_grad():
        assert student(x, tt, tt, text).shape == x.shape
        # the base under the adapters is the teacher, untouched: the adapters off give the teacher's output
        base = student.shared.role("teacher")
        assert torch.allclose(base(x, tt, tt, text), teacher(x, tt, tt, text), atol=1e-5)
        assert not torch.allclose(student(x, tt, tt, text), teacher(x, tt, tt, text), atol=1e-5)
    assert main(["sample", str(s2), "--steps", "2", "--num", "1", "--out", str(tmp_path / "clip")]) == 0
    assert main(["stage2", "--no-progress", f"train.out_dir={tmp_path / 'x'}", f"model.init={s1}", *SHAPES_TINY,
                 "model.lora_rank=8"]) == 2


@pytest.mark.slow
def test_demo_runs_every_stage_and_sweeps_them_together(tmp_path):
    """The default demo trains the baselines in a second process; --sequential trains all four stages here.
    With one thread everywhere both give the same table. The second demo runs in the first one's folder: a
    demo starts its runs over."""
    tables = {}
    out = tmp_path / "demo"
    for mode in ("parallel", "sequential"):
        flags = ["--sequential"] if mode == "sequential" else []
        assert main(["demo", "--out", str(out), "--budget", "2,1,2,1", "sweep.num_samples=4", "sweep.steps=[1,2]",
                     "train.threads=1", "--no-progress", *flags]) == 0
        tables[mode] = _rows(out / "sweep" / "sweep.csv")
        assert (out / "consistency_dmd" / "checkpoints" / "step_000001").is_dir()
        assert (out / "sweep" / "grid.mp4").stat().st_size > 0
    samplers = list(dict.fromkeys(r["sampler"] for r in tables["parallel"]))
    assert samplers == ["AnyFlow Stage 1", "AnyFlow Stage 2", "consistency distillation", "consistency + DMD",
                        "teacher Euler"]
    assert tables["parallel"] == tables["sequential"]


def test_a_run_config_holds_the_sections_its_kind_reads(capsys):
    """One optimizer per trained role (optim.<role>), and only the sections the kind reads: a typed key that
    nothing would read is an error, and a saved config has none."""
    assert main(["stage2", "--dry-run", "optim.critic.lr=1e-4"]) == 0
    saved = yaml.safe_load(capsys.readouterr().out)
    assert saved["optim"]["critic"]["lr"] == 1e-4 and saved["optim"]["student"]["lr"] == 2e-5   # the preset's
    assert set(saved) == {"kind", "world", "model", "train", "optim", "ema", "sweep", "validation", "stage1", "stage2"}
    assert set(saved["world"]) == {"name", "shapes", "text"}
    assert main(["stage2", "--dry-run", "optim.lr=1e-3"]) == 2
    assert "unknown config key 'optim.student.lr'" not in capsys.readouterr().err


def test_lora_roles_get_the_delta_time_type_asked_for(tmp_path):
    from anystep.recipes import build_trainer

    cfg = resolve("shapes_stage1", ["model.lora_rank=4", "model.deltatime_type=t-r", "train.steps=1",
                                    f"train.out_dir={tmp_path}"])
    student = build_trainer(cfg, progress=False).method.roles["student"]
    assert student.shared.base.config.deltatime_type == "t-r"


@pytest.mark.slow
def test_a_network_other_than_model_init_is_refused_before_training(tmp_path, capsys):
    """model.layers=2 on a run from a 4-layer teacher used to train the 4-layer network, save layers=2 in its
    config and then fail to reload; and model.init from another world failed with an AttributeError."""
    t = tmp_path / "teacher"
    assert main(["teacher", "--config", "gmm_teacher", "--no-progress", f"train.out_dir={t}", *GMM_TINY,
                 *GMM_NET]) == 0
    capsys.readouterr()
    assert main(["stage1", "--config", "gmm_stage1", "--no-progress", f"train.out_dir={tmp_path / 's'}",
                 f"model.init={t}", *GMM_TINY, "model.network.depth=2"]) == 2
    assert "keeps that run's network: drop model.network" in capsys.readouterr().err
    assert main(["stage1", "--config", "shapes_stage1", "--no-progress", f"train.out_dir={tmp_path / 's'}",
                 f"model.init={t}", *SHAPES_TINY]) == 2
    assert "'gmm'-world run" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sweeping_a_teacher_run_alone_gives_its_euler_row_once(tmp_path):
    """A teacher run's own row is the teacher's Euler sampler with CFG: it is not swept a second time."""
    from anystep.recipes import sweep
    result = sweep(["shipped:shapes_teacher"], settings={"steps": (1, 2), "num_samples": 2}, out=tmp_path,
                   progress=False)
    assert [(r["sampler"], r["N"]) for r in result.rows] == [("teacher", 1), ("teacher", 2)]
