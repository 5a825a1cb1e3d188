"""Checkpoints, resumes and the run folder: warm-up, safe loading, crash safety, locking, clear errors."""

import pytest
import torch
from diffusers.optimization import get_constant_schedule_with_warmup
from torch import nn

from anystep.cli import main
from anystep.config import resolve
from anystep.train.checkpoint import find_checkpoint
from anystep.train.loop import NonFiniteLossError, Trainer
from anystep.train.methods import Method, Phase

GMM = ["model.hidden=32", "model.depth=1", "train.batch_size=16", "train.log_every=1", "optim.warmup_steps=2",
       "optim.ema_warmup_steps=2"]


def teacher(out, *args):
    """``anystep teacher`` argv for a tiny gmm run in ``out``: flags first, then the overrides."""
    flags = [a for a in args if a.startswith("--")]
    return ["teacher", "--config", "gmm_teacher", "--no-progress", *flags, f"train.out_dir={out}", *GMM,
            *(a for a in args if not a.startswith("--"))]


def _cfg(out, *extra, kind="stage1"):
    return resolve(None, [f"kind={kind}", "world.name=gmm", f"train.out_dir={out}", *GMM, *extra])


class Toy(Method):
    """One linear layer; ``loss(module, step)`` is the loss (default: its squared output on fixed inputs)."""

    def __init__(self, loss=None):
        super().__init__(roles={"student": nn.Linear(4, 1)}, ema_roles=("student",))
        self.x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        self.loss = loss or (lambda m, step: m(self.x).pow(2).mean())

    def phases(self, step, generator):
        return [Phase("student", lambda: ({"loss/toy": self.loss(self.roles["student"], step)}, {}))]


def _toy_trainer(out, method=None, **kwargs):
    torch.manual_seed(0)
    kwargs = {"steps": 3, "log_every": 1, "checkpoint_every": 1, "progress": False, **kwargs}
    return Trainer(method or Toy(), out_dir=out, **kwargs)


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
                             "model.init=shipped:shapes_teacher", *GMM],
                    "model.init=shipped:shapes_teacher is a 'shapes'-world run", "'gmm'")



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
