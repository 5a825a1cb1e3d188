"""The kill drill: a training process is SIGKILLed at chosen points (``ANYSTEP_FAULT=<point>:<step>``, the test
hook of :func:`anystep.train.checkpoint.fault_point`) and resumed, again and again. Each time the newest
complete checkpoint is found and equals an uninterrupted run's at that step, the next run leaves no orphan,
and the run ends bit-identical to the uninterrupted one (weights, EMA, metrics)."""

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch

from anystep.train.checkpoint import complete_checkpoints, load_tensors

pytestmark = pytest.mark.slow

RUN = ["teacher", "--config", "gmm_teacher", "--no-progress"]
TINY = ["model.network.hidden=32", "model.network.depth=1", "train.batch_size=16", "train.steps=12",
        "train.checkpoint_every=3", "train.log_every=1", "train.threads=1", "optim.teacher.warmup_steps=2",
        "ema.warmup_steps=2"]

# (resume flag, fault, newest complete step after the kill, dot-entries the kill leaves in checkpoints/)
CHAIN = [
    ("--resume-if-present", "before_pointer:3", 3, []),                 # a fresh start, killed after its first
                                                                        # checkpoint, before any `latest`
    ("--resume", "mid_step:5", 3, []),
    ("--resume", "checkpoint_write:6", 3, [".tmp_step_000006_"]),       # a half-written checkpoint
    ("--resume", "before_pointer:6", 6, []),                            # `latest` still names step 3
    ("--resume", "during_prune:9", 9, [".trash_step_000003_"]),         # step 3 renamed away, not yet deleted
]


def _command(out, *flags, keep=2, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "ANYSTEP_FAULT"}
    if fault:
        env["ANYSTEP_FAULT"] = fault
    argv = [sys.executable, "-m", "anystep", *RUN, *flags, f"train.out_dir={out}", *TINY,
            f"train.keep_checkpoints={keep}"]
    return argv, env


def _run(out, *flags, fault=None):
    argv, env = _command(out, *flags, fault=fault)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, keeping every checkpoint (the number kept changes no weight)."""
    out = tmp_path_factory.mktemp("reference")
    argv, env = _command(out, keep=0)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finished():
        if proc.wait(timeout=300) != 0:
            pytest.fail(f"the reference run failed:\n{proc.stdout.read()}")
        return out
    yield finished
    proc.kill()
    proc.wait()


def _same_weights(a, b):
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in names:
        x, y = load_tensors(a / name), load_tensors(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (a, name)


def _metrics(out):
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)]


def _dot_entries(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith(".")) if folder.is_dir() else []


def test_killed_at_every_point_and_resumed_ends_as_an_uninterrupted_run(tmp_path, reference):
    out, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    ref = None
    for flag, fault, newest, left in CHAIN:
        proc = _run(out, flag, fault=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr)
        found = complete_checkpoints(ck)[-1]
        assert found.name == f"step_{newest:06d}", fault
        dots = _dot_entries(ck)     # only what this kill left: the run's start removed the earlier ones
        assert len(dots) == len(left) and all(d.startswith(p) for d, p in zip(dots, left)), (fault, dots)
        if fault == "before_pointer:6":
            assert (ck / "latest").read_text() == "step_000003\n"
        ref = ref or reference()
        _same_weights(found, ref / "checkpoints" / found.name)
    proc = _run(out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(ck)) == ["latest", "step_000009", "step_000012"]
    assert _dot_entries(out) == [".lock"] and (ck / "latest").read_text() == "step_000012\n"
    for step in ("step_000009", "step_000012"):
        _same_weights(ck / step, ref / "checkpoints" / step)
    assert _metrics(out) == _metrics(ref) and len(_metrics(out)) == 12
