"""Checkpoints, resumes and the run folder: warm-up, safe loading, crash safety, locking, clear errors."""

import csv
import fcntl
import importlib
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_constant_schedule_with_warmup
from torch import nn

from anystep.cli import main
from anystep.config import resolve
from anystep.recipes import build_trainer, load_model, train
from anystep.train.checkpoint import (
    CheckpointError,
    clean_run_folder,
    find_checkpoint,
    load_tensors,
    save_checkpoint,
)
from anystep.train.loop import EMAConfig, NonFiniteLossError, OptimConfig, Trainer
from anystep.train.method import Method, Phase

GMM = ["model.network.hidden=32", "model.network.depth=1", "train.batch_size=16", "train.log_every=1",
       "ema.warmup_steps=2"]


def _gmm(role):
    """The tiny gmm settings of a run that trains ``role`` (its optimizer is optim.<role>)."""
    return [*GMM, f"optim.{role}.warmup_steps=2"]


def teacher(out, *args):
    """``anystep teacher`` argv for a tiny gmm run in ``out``: flags first, then the overrides."""
    flags = [a for a in args if a.startswith("--")]
    return ["teacher", "--config", "gmm_teacher", "--no-progress", *flags, f"train.out_dir={out}", *_gmm("teacher"),
            *(a for a in args if not a.startswith("--"))]


def _cfg(out, *extra, kind="stage1"):
    return resolve(None, [f"kind={kind}", "world.name=gmm", f"train.out_dir={out}", *_gmm("student"), *extra])


class Toy(Method):
    """One linear layer; ``loss(module, step)`` is the loss (default: its squared output on fixed inputs)."""

    def __init__(self, loss=None):
        super().__init__(roles={"student": nn.Linear(4, 1)})
        self.x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        self.loss = loss or (lambda m, step: m(self.x).pow(2).mean())

    def phases(self, step, generator):
        return [Phase("student", lambda part: ({"loss/toy": self.loss(self.roles["student"], step)}, {}))]


def _toy_trainer(out, method=None, **kwargs):
    torch.manual_seed(0)
    kwargs = {"steps": 3, "log_every": 1, "checkpoint_every": 1, "progress": False, "files": {"config.yaml": ""},
              **kwargs}
    optim = {"student": OptimConfig(**kwargs.pop("optim", {"warmup_steps": 0}))}
    return Trainer(method or Toy(), out_dir=out, optim=optim, ema={"student": EMAConfig(0.999, 0)}, **kwargs)


def _one_line_error(capsys, argv, *needles):
    """``anystep argv`` exits 2 with a one-line message holding every needle (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------------------------------------- 8(d)
@pytest.mark.parametrize("warmup", [1, 3, 10])
def test_lr_warmup_is_diffusers_constant_schedule_with_warmup(tmp_path, warmup):
    """The official schedule: the lr of update k is lr * k / warmup before ``warmup``, so the first is 0."""
    trainer = _toy_trainer(tmp_path, optim={"lr": 0.1, "warmup_steps": warmup}, steps=12)
    opt, module = trainer.optimizers["student"], trainer.method.roles["student"]
    start = [p.detach().clone() for p in module.parameters()]
    used, after_first = [], None
    for _ in range(12):
        used.append(opt.param_groups[0]["lr"])
        trainer.train_step()
        trainer.step += 1
        after_first = after_first or [p.detach().clone() for p in module.parameters()]
    ref_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = get_constant_schedule_with_warmup(ref_opt, num_warmup_steps=warmup)
    expected = []
    for _ in range(12):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert used == expected and used[0] == 0.0 and used[-1] == 0.1
    assert all(torch.equal(a, b) for a, b in zip(after_first, start))   # lr 0: the first update moved nothing


# ---------------------------------------------------------------------------------------------- 9
def test_trainer_state_loads_weights_only_and_a_pickled_payload_never_runs(tmp_path):
    ckpt = _toy_trainer(tmp_path / "run").fit()
    assert set(torch.load(ckpt / "trainer.pt", weights_only=True)) >= {"optimizers", "schedulers", "step"}
    assert _toy_trainer(tmp_path / "other").resume(tmp_path / "run") == 3
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    pickle.loads(pickle.dumps(Payload()))      # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    state["method"] = Payload()
    torch.save(state, ckpt / "trainer.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*trainer\.pt.*could run code"):
        _toy_trainer(tmp_path / "other").resume(ckpt)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- 10(a), (c)
def test_resume_takes_the_newest_complete_checkpoint_whatever_latest_says(tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(run, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    train(cfg, progress=False)
    ck = run / "checkpoints"
    # killed between the rename of step_4 and the update of `latest`
    (ck / "latest").write_text("step_000002\n")
    assert build_trainer(cfg, progress=False).resume() == 4
    # a folder that is not complete (no COMPLETE marker, no EMA weights) is never read, even when pointed to
    (ck / "step_000006").mkdir()
    (ck / "step_000006" / "student.safetensors").write_bytes((ck / "step_000004" / "student.safetensors").read_bytes())
    (ck / "latest").write_text("step_000006\n")
    assert find_checkpoint(run).name == "step_000004" and load_model(str(run))[1].train.steps == 4
    # killed between the rename of the very first checkpoint and the first `latest`
    shutil.rmtree(ck / "step_000004")
    shutil.rmtree(ck / "step_000006")
    (ck / "latest").unlink()
    assert build_trainer(cfg, progress=False).resume() == 2


DRIVER = """
import sys, torch
from anystep.train.checkpoint import save_checkpoint
root, step, value = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
save_checkpoint(root, step, {"student": {"w": torch.full((3,), value)}}, {"step": step}, {"config.yaml": "kind: stage1\\n"})
"""


def _save(root, step, value):
    return save_checkpoint(root, step, {"student": {"w": torch.full((3,), value)}}, {"step": step}, {"config.yaml": "kind: stage1\n"})


def test_a_kill_while_a_step_is_saved_again_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 3, 1.0)
    env = {**os.environ, "ANYSTEP_FAULT": "replace_old:3"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(root), "3", "2.0"], env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "step_000003").exists()      # killed between moving the old one away and the new in place
    assert load_tensors(find_checkpoint(tmp_path) / "student.safetensors")["w"][0] == 1.0   # still read
    # saving the step again before any cleanup, and failing to put the new one in place, keeps the old one
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            raise OSError("disk full")
        real_replace(src, dst)
    monkeypatch.setattr("anystep.train.checkpoint.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        _save(root, 3, 3.0)
    monkeypatch.undo()
    assert load_tensors(find_checkpoint(tmp_path) / "student.safetensors")["w"][0] == 1.0
    clean_run_folder(tmp_path)
    assert sorted(os.listdir(root)) == ["latest", "step_000003"]
    assert load_tensors(find_checkpoint(tmp_path) / "student.safetensors")["w"][0] == 1.0
    _save(root, 3, 2.0)
    assert sorted(os.listdir(root)) == ["latest", "step_000003"]
    assert load_tensors(find_checkpoint(tmp_path) / "student.safetensors")["w"][0] == 2.0


def test_training_starts_by_cleaning_what_kills_left(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=2", "train.checkpoint_every=1"), progress=False)
    ck = run / "checkpoints"
    for orphan in (ck / ".tmp_step_000003_dead", ck / ".trash_step_000001_dead", run / ".trash_checkpoints_dead"):
        orphan.mkdir()
        (orphan / "student.safetensors").write_bytes(b"partial")
    (ck / ".latest.dead").write_text("step_0")
    (run / ".metrics.csv.dead").write_text("step\n")
    train(_cfg(run, "train.steps=3", "train.checkpoint_every=1"), resume=True, progress=False)
    assert sorted(os.listdir(ck)) == ["latest", "step_000002", "step_000003"]
    assert sorted(p for p in os.listdir(run) if p.startswith(".")) == [".lock"]


# ---------------------------------------------------------------------------------------------- 10(d)
def test_a_second_run_into_a_busy_folder_fails_at_once(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)              # another training run holds the folder
    try:
        _one_line_error(capsys, teacher(run, "train.steps=1"), "in use by another",
                        str(run))
    finally:
        os.close(fd)
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()
    assert main(teacher(run, "train.steps=1")) == 0     # released: it runs


def _metric_rows(run):
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)]


def test_a_finished_run_is_never_restarted_by_accident_and_overwrite_starts_over(tmp_path, capsys):
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(teacher(run, "train.steps=4", "optim.teacher.lr=0.01")) == 0
    metrics = (run / "metrics.csv").read_text()
    _one_line_error(capsys, teacher(run, "train.steps=3"), str(run), "--resume",
                    "--overwrite")
    assert (run / "metrics.csv").read_text() == metrics
    assert main(teacher(run, "train.steps=3", "--overwrite")) == 0
    assert main(teacher(ref, "train.steps=3")) == 0
    # started over cleanly: the same as a run in an empty folder
    assert sorted(os.listdir(run / "checkpoints")) == sorted(os.listdir(ref / "checkpoints"))
    for name in ("teacher", "teacher_ema"):
        a = load_tensors(run / "checkpoints" / "step_000003" / f"{name}.safetensors")
        b = load_tensors(ref / "checkpoints" / "step_000003" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert _metric_rows(run) == _metric_rows(ref) and len(_metric_rows(run)) == 3


# ---------------------------------------------------------------------------------------------- 10(e)
def test_optimizer_settings_given_with_resume_take_effect(tmp_path):
    run = tmp_path / "run"
    assert main(teacher(run, "train.checkpoint_every=1", "train.steps=3")) == 0
    new = ["optim.teacher.lr=0.02", "optim.teacher.betas=[0.5,0.6]", "optim.teacher.weight_decay=0.1"]
    assert main(teacher(run, "train.checkpoint_every=1", "train.steps=4", "--resume", *new)) == 0
    ck = run / "checkpoints"
    group = torch.load(ck / "step_000004" / "trainer.pt", weights_only=True)["optimizers"]["teacher"]
    assert (group["param_groups"][0]["lr"], group["param_groups"][0]["betas"]) == (0.02, (0.5, 0.6))
    assert _metric_rows(run)[-1]["lr/teacher"] == "0.02"
    # step 4's update is AdamW's with the new settings (the moments are those after it)
    trainer = build_trainer(resolve("gmm_teacher", [f"train.out_dir={run}", *_gmm("teacher")]), progress=False)
    name = next(n for n, p in trainer.method.roles["teacher"].named_parameters() if p.requires_grad)
    before = load_tensors(ck / "step_000003" / "teacher.safetensors")[name]
    after = load_tensors(ck / "step_000004" / "teacher.safetensors")[name]
    s = group["state"][0]
    k = float(s["step"])
    lr, (b1, b2), wd = 0.02, (0.5, 0.6), 0.1
    expected = before * (1 - lr * wd) - lr / (1 - b1 ** k) * s["exp_avg"] / (
        s["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** k) + 1e-8)
    assert torch.allclose(after, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- 10(f), (i)
@pytest.mark.parametrize("override, message", [
    ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
])
def test_bad_train_settings_are_refused_before_training(override, message, capsys):
    _one_line_error(capsys, teacher("runs/x", "--dry-run", override), message)


def test_a_model_init_from_another_world_is_a_clear_error(tmp_path, capsys):
    _one_line_error(capsys, ["stage1", "--config", "gmm_stage1", "--no-progress", f"train.out_dir={tmp_path}",
                             "model.init=shipped:shapes_teacher", "optim.student.warmup_steps=2"],
                    "model.init=shipped:shapes_teacher is a 'shapes'-world run", "'gmm'")


@pytest.mark.parametrize("how", ["under_a_file", "read_only"])
def test_an_unwritable_out_dir_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch, how):
    if how == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "ro" / "run"
        out.parent.mkdir()
        out.parent.chmod(0o555)
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"

    def built(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(importlib.import_module("anystep.recipes.train"), "build_trainer", built)
    _one_line_error(capsys, teacher(out, "train.steps=1"), "cannot write", str(out))


def test_resuming_another_architecture_names_the_mismatch(tmp_path, capsys):
    assert main(teacher(tmp_path, "train.steps=1")) == 0
    err = _one_line_error(capsys, teacher(tmp_path, "train.steps=2", "model.network.hidden=48", "--resume"),
                          "does not fit this model", "shape mismatch")
    assert "(48," in err or ", 48)" in err


def test_resume_if_present_starts_fresh_then_resumes(tmp_path, capsys):
    def run(*args):
        return teacher(tmp_path, "train.checkpoint_every=1", *args)
    _one_line_error(capsys, run("train.steps=2", "--resume"), "nothing to resume", "--resume-if-present")
    assert main(run("train.steps=2", "--resume-if-present")) == 0
    step2 = (tmp_path / "checkpoints" / "step_000002").stat().st_ino
    assert main(run("train.steps=3", "--resume-if-present")) == 0
    assert (tmp_path / "checkpoints" / "step_000002").stat().st_ino == step2    # resumed: step 2 not redone
    assert [r["step"] for r in _metric_rows(tmp_path)] == ["1", "2", "3"]


# ---------------------------------------------------------------------------------------------- 10(g)
def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    trainer = _toy_trainer(tmp_path, Toy(lambda m, step: m.weight.sum() * float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"^step 0: loss term 'loss/toy' of role 'student' is nan; "
                                                 r"training stopped, no checkpoint was written yet$"):
        trainer.fit()
    assert not (tmp_path / "checkpoints").exists()


def test_a_non_finite_gradient_stops_training_before_the_update(tmp_path):
    def loss(m, step):   # finite, but at step 2 its gradient is infinite (d sqrt(u) / du at u = 0)
        value = m.weight.pow(2).sum()
        return value + torch.sqrt(m.weight - m.weight.detach()).sum() if step == 2 else value

    trainer = _toy_trainer(tmp_path, Toy(loss))
    with pytest.raises(NonFiniteLossError, match=r"step 2: the gradient norm of role 'student' is inf; training "
                                                 r"stopped, the last good checkpoint is .*step_000002$"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.method.roles["student"].parameters())
    assert find_checkpoint(tmp_path).name == "step_000002"


def test_non_finite_weights_are_never_saved(tmp_path):
    # an absurd lr with beta1 = 0: each update moves the weight by -3e38, so the second overflows to -inf while
    # the loss (that weight) and its gradient (1) stay finite
    optim = {"lr": 3e38, "betas": (0.0, 0.95), "warmup_steps": 0}
    trainer = _toy_trainer(tmp_path, Toy(lambda m, step: m.weight[0, 0]), steps=2, optim=optim)
    with pytest.raises(NonFiniteLossError, match=r"step 2: weights of role 'student' are not finite .*the last good "
                                                 r"checkpoint is .*step_000001$"):
        trainer.fit()
    assert find_checkpoint(tmp_path).name == "step_000001"


# ---------------------------------------------------------------------------------------------- 10(h)
@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask, folder_mode, file_mode):
    old = os.umask(umask)
    try:
        ckpt = _toy_trainer(tmp_path / "run").fit()
    finally:
        os.umask(old)
    assert ckpt.stat().st_mode & 0o777 == folder_mode
    files = [*ckpt.iterdir(), ckpt.parent / "latest", tmp_path / "run" / "metrics.csv"]
    assert len(files) == 7 and {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: file_mode for f in files}
