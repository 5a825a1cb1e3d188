import shutil

import pytest
import torch

from anystep.config import resolve
from anystep.recipes import build_trainer, load_model, train
from anystep.train.checkpoint import CheckpointError, find_checkpoint, load_tensors
from anystep.train.loop import NonFiniteLossError

TINY = ["world.name=gmm", "train.batch_size=16", "train.log_every=1", "ema.warmup_steps=2"]
NET = ["model.network.hidden=32", "model.network.depth=1"]


def _cfg(tmp_path, *extra, kind="stage1"):
    """A tiny gmm run; its trained roles at lr 1e-3 with a 2-step warm-up; a fresh network unless it has an init."""
    roles = {"teacher": ["teacher"], "stage1": ["student"], "stage2": ["student", "critic"]}[kind]
    optim = [f"optim.{r}.{k}" for r in roles for k in ("warmup_steps=2", "lr=1e-3")]
    net = [] if any(e.startswith("model.init=") for e in extra) else NET
    return resolve(None, [f"kind={kind}", f"train.out_dir={tmp_path}", *TINY, *net, *optim, *extra])


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = train(_cfg(tmp_path / "a", "train.steps=6", "train.checkpoint_every=100"), progress=False)
    # the same run, stopped after 3 steps and resumed
    first = _cfg(tmp_path / "b", "train.steps=3", "train.checkpoint_every=100")
    train(first, progress=False)
    resumed = train(_cfg(tmp_path / "b", "train.steps=6", "train.checkpoint_every=100"), resume=True,
                    progress=False)
    for name in ("student", "student_ema"):
        a, b = load_tensors(straight / f"{name}.safetensors"), load_tensors(resumed / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_teacher_run_then_stage1_from_it(tmp_path):
    ckpt = train(_cfg(tmp_path / "t", "train.steps=2", kind="teacher"), progress=False)
    _model, cfg, role = load_model(str(tmp_path / "t"))
    assert role == "teacher" and cfg.kind == "teacher"
    s1 = train(_cfg(tmp_path / "s", "train.steps=2", f"model.init={tmp_path / 't'}"), progress=False)
    student, _, role = load_model(str(s1))
    assert role == "student" and student.flowmap
    assert ckpt.name == "step_000002"


def test_nan_loss_stops_with_the_step_and_term_and_keeps_the_last_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=6", "train.checkpoint_every=2")
    trainer = build_trainer(cfg, progress=False)
    trainer.steps = 2
    good = trainer.fit()
    before = load_tensors(good / "student.safetensors")
    with torch.no_grad():
        for p in trainer.method.roles["student"].parameters():
            p.fill_(float("nan"))
    trainer.steps = 6
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss term 'loss/stage1'"):
        trainer.fit()
    assert find_checkpoint(tmp_path) == good
    after = load_tensors(good / "student.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_and_corrupt_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope"))
    ckpt = train(_cfg(tmp_path / "run", "train.steps=1"), progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / "student_ema.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt checkpoint file .*student_ema.safetensors"):
        load_model(str(bad))
    (bad / "student_ema.safetensors").unlink()
    (bad / "student.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint|missing"):
        load_model(str(bad))
    # `latest` is a hint for people, never trusted: the newest complete checkpoint is found whatever it says
    (ckpt.parent / "latest").write_text("step_999999\n")
    assert find_checkpoint(tmp_path / "run") == ckpt
    # a run from before checkpoints had a COMPLETE marker is read through `latest`: a dangling one is an error
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "run"))


def test_checkpoints_are_pruned_and_latest_points_to_the_newest(tmp_path):
    ckpt = train(_cfg(tmp_path, "train.steps=5", "train.checkpoint_every=1", "train.keep_checkpoints=2"),
                 progress=False)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_000004", "step_000005"] and find_checkpoint(tmp_path) == ckpt
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,") and len(lines) == 6


@pytest.mark.slow
def test_stage2_resume_equals_an_uninterrupted_run(tmp_path):
    """Stage 2 carries more state (critic, its optimizer, the (N, k) plan stream, the rebalance mean)."""
    t = train(_cfg(tmp_path / "t", "train.steps=2", kind="teacher"), progress=False)
    s1 = train(_cfg(tmp_path / "s1", "train.steps=2", f"model.init={t.parent.parent}"), progress=False)
    extra = [f"model.init={s1.parent.parent}", "stage2.dmd_batch_size=4", "train.checkpoint_every=100"]
    straight = train(_cfg(tmp_path / "a", "train.steps=6", *extra, kind="stage2"), progress=False)
    train(_cfg(tmp_path / "b", "train.steps=3", *extra, kind="stage2"), progress=False)
    resumed = train(_cfg(tmp_path / "b", "train.steps=6", *extra, kind="stage2"), resume=True, progress=False)
    for name in ("student", "student_ema", "critic"):
        a, b = load_tensors(straight / f"{name}.safetensors"), load_tensors(resumed / f"{name}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not (straight / "critic_ema.safetensors").exists()


def test_the_ablation_switches_train_and_are_checked(tmp_path):
    """The paper's ablations as switches (issue 17): ``stage1.weight_type=normal`` (Fig. 6b) and
    ``model.delta_init=zero`` (Fig. 7) train a Stage-1 student that Stage 2 continues: the run's student was
    built with its time embedder's output layer scaled by 1 / (1 - g) and its delta branch, zero at the start
    (tests/test_models.py), has moved. Settings that cannot apply are refused."""
    from anystep.config import ConfigError
    train(_cfg(tmp_path / "t", "train.steps=2", kind="teacher"), progress=False)
    init = f"model.init={tmp_path / 't'}"
    s1 = train(_cfg(tmp_path / "s", "train.steps=3", init, "model.delta_init=zero", "stage1.weight_type=normal",
                    "validation.every=0"), progress=False)
    weights = load_tensors(s1 / "student.safetensors")
    assert weights["delta_embedder.linear_2.weight"].abs().sum() > 0          # zero at the start, trained since
    teacher = load_tensors(find_checkpoint(tmp_path / "t" / "checkpoints") / "teacher_ema.safetensors")
    ratio = weights["time_embedder.linear_2.weight"].norm() / teacher["time_embedder.linear_2.weight"].norm()
    assert abs(float(ratio) - 1 / 0.75) < 0.02                                # 3 steps at lr 1e-3 move it little
    train(_cfg(tmp_path / "s2", "train.steps=1", f"model.init={tmp_path / 's'}", "stage2.dmd_batch_size=8",
               "stage2.rollout_steps=[2]", "validation.every=0", kind="stage2"), progress=False)
    for bad in (["model.delta_init=zero", "kind=teacher"], ["model.delta_init=ones"],
                ["stage1.weight_type=gaussian"]):
        with pytest.raises(ConfigError, match="delta_init|weight_type"):
            resolve(None, [*TINY, *bad])
