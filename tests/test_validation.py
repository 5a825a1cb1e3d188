"""Validation during training: what it writes, that it judges the EMA the checkpoint holds, and that it leaves
training exactly as it was."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from anystep.build import build_world, load_model
from anystep.config import ConfigError, resolve
from anystep.evaluate.sweep import Sampler, sample_batched
from anystep.recipes import train
from anystep.train.checkpoint import find_checkpoint

SHAPES = ["train.batch_size=4", "train.threads=1", "train.log_every=2", "train.steps=4", "ema.warmup_steps=1",
          "validation.num_samples=3", "validation.steps=[1,2]"]


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_validation_writes_pictures_metrics_and_the_step_rows(tmp_path, capsys):
    run = tmp_path / "s1"
    train(resolve("shapes_stage1", [*SHAPES, "validation.every=3", f"train.out_dir={run}"]), progress=False)
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step_000003", "step_000004"]  # + the end
    report = json.loads((run / "validation" / "step_000004" / "metrics.json").read_text())
    assert [r["N"] for r in report["rows"]] == [1, 2] and report["primary_metric"] == "total"
    assert (run / "validation" / "step_000004" / report["picture"]).stat().st_size > 0
    rows = _rows(run)
    assert [r["step"] for r in rows] == ["2", "3", "4"]        # one row a step: validation joins the losses' row
    assert rows[0]["val/N1/total"] == "" and rows[1]["loss/stage1"] == ""
    assert float(rows[1]["val/N2/total"]) == pytest.approx(report_of(run, 3)["rows"][1]["total"])
    assert float(rows[2]["val/N1/total"]) == pytest.approx(report["rows"][0]["total"]) and rows[2]["loss/stage1"]
    assert float(rows[2]["time/validation_sec"]) > 0
    assert "validation at step 4: total: N=1" in capsys.readouterr().out


def report_of(run, step):
    return json.loads((run / "validation" / f"step_{step:06d}" / "metrics.json").read_text())


def test_validation_judges_the_ema_weights_the_checkpoint_holds(tmp_path):
    """The figures of the last validation are those of the checkpoint's EMA, loaded and sampled by the sweep's
    path (the EMA differs from the trained weights: decay 0.9 after one step)."""
    run = tmp_path / "s1"
    cfg = resolve("shapes_stage1", [*SHAPES, "ema.decay=0.9", f"train.out_dir={run}"])
    train(cfg, progress=False)
    model, _, _ = load_model(str(run))                          # the student's EMA
    ckpt = find_checkpoint(run / "checkpoints")
    ema, live = load_file(str(ckpt / "student_ema.safetensors")), load_file(str(ckpt / "student.safetensors"))
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    world = build_world(cfg)
    ev, judge = world.eval_set(3, cfg.validation.seed), world.judge()
    for row in report_of(run, 4)["rows"]:
        x = sample_batched(Sampler("s", model, 1.0), world.null_cond, ev.noise, ev.cond, row["N"], cfg.sweep.shift)
        expected = judge.score(x, ev, cfg.spec.guidance(cfg))
        assert row["total"] == pytest.approx(expected["total"], abs=1e-6)


@pytest.mark.parametrize("preset", ["shapes_stage1", "shapes_far_stage1"])
def test_validation_leaves_training_bit_identical(preset, tmp_path):
    """Validating after every step changes no trained weight, EMA or logged loss (it draws from no generator
    of the run and gives the weights back)."""
    runs = {}
    for every in (0, 1):
        runs[every] = tmp_path / f"v{every}"
        train(resolve(preset, [*SHAPES, f"validation.every={every}", f"train.out_dir={runs[every]}"]), progress=False)
    assert not (runs[0] / "validation").exists() and (runs[1] / "validation" / "step_000001").exists()
    for name in ("student.safetensors", "student_ema.safetensors"):
        a, b = (load_file(str(find_checkpoint(r / "checkpoints") / name)) for r in runs.values())
        assert all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[{k: v for k, v in r.items() if k.startswith("loss/")} for r in _rows(run) if r["loss/stage1"]]
              for run in runs.values()]
    assert losses[0] == losses[1]


def test_a_teacher_run_validates_its_teacher_with_euler_and_cfg(tmp_path):
    run = tmp_path / "t"
    train(resolve("gmm_teacher", ["train.steps=2", "train.batch_size=16", "train.threads=1", "validation.every=1",
                                  "validation.num_samples=64", f"train.out_dir={run}"]), progress=False)
    report = report_of(run, 2)
    assert report["sampler"] == "teacher (EMA)" and report["primary_metric"] == "fd"
    assert (run / "validation" / "step_000002" / "grid.png").exists()       # the gmm world's scatter


@pytest.mark.parametrize("bad, match", [("validation.steps=[0,4]", "steps >= 1"), ("validation.every=-1", "every"),
                                        ("validation.num_samples=0", "num_samples"), ("validation.evry=3", "evry")])
def test_bad_validation_settings_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        resolve("shapes_stage1", [bad])
