"""A training step reads its statistics from the device once per phase (anystep.train.loop), and logs the
numbers it logged before.

A CPU run has no device to wait for, so :class:`DeviceSyncs` follows where each tensor would live on a GPU:
the networks' parameters and buffers and the world's batches, conditions and null condition as the run gets
them (:class:`~anystep.worlds.base.OnDevice`) are device tensors, and so is everything computed from one; the
random draws (CPU generators) and what is computed only from them stay on the host (a draw the library then
moves to the device counts as host until it meets a device tensor: a read of it alone would be missed). A device sync is any read of a device tensor's values by the host: ``.item()`` / ``float()`` /
``bool()`` (``aten._local_scalar_dense``), ``.tolist()``, ``.cpu()``, ``nonzero`` and boolean-mask indexing
(their output size depends on the values). torch's optimizers read their host-side step counters the same way
(``torch/optim``): those are no device syncs and are not counted.
"""

from __future__ import annotations

import contextlib
import csv
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import anystep
from anystep.config import resolve
from anystep.recipes import build_trainer, train

LIBRARY = str(Path(anystep.__file__).parent) + "/"   # the library's files (not the tests', wherever the clone is)
SIZED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
         torch.ops.aten.masked_select.default}


class DeviceSyncs(TorchDispatchMode):
    """Counts the host's reads of (would-be) device tensors inside the ``with`` block, by the library line
    that made each (``self.where``)."""

    def __init__(self, modules, world):
        super().__init__()
        self.device = WeakIdKeyDictionary()
        self.world = world
        for t in [t for m in modules for t in [*m.parameters(), *m.buffers()]] + _tensors(world.null_cond):
            self.device[t] = True
        self.where: list[str] = []

    def on_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and (t in self.device or t.requires_grad)

    def note(self, what: str) -> None:
        stack = traceback.extract_stack()
        if any("/torch/optim/" in f.filename for f in stack):
            return
        line = next((f for f in reversed(stack) if f.filename.startswith(LIBRARY)), None)
        self.where.append(f"{what} at {line.filename[len(LIBRARY):]}:{line.lineno}" if line else what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        device = any(self.on_device(t) for t in inputs)
        masked = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool and self.on_device(i) for i in args[1])
        if device and func in SIZED or masked:
            self.note(str(func))
        out = func(*args, **(kwargs or {}))
        if device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.device[t] = True
        return out

    @contextlib.contextmanager
    def watching(self):
        """The mode, with ``.tolist()`` / ``.cpu()`` counted (on the CPU they dispatch nothing) and the world's
        data marked as it arrives."""
        tolist, cpu = torch.Tensor.tolist, torch.Tensor.cpu
        world, batch, conditions = self.world, self.world.batch, self.world.conditions
        mode = self

        def read(original, name):
            def f(t, *a, **k):
                if mode.on_device(t):
                    mode.note(name)
                return original(t, *a, **k)
            return f

        def arriving(original):
            def f(*a, **k):
                out = original(*a, **k)
                for t in _tensors(out):
                    mode.device[t] = True
                return out
            return f

        torch.Tensor.tolist, torch.Tensor.cpu = read(tolist, "tolist"), read(cpu, "cpu")
        world.batch, world.conditions = arriving(batch), arriving(conditions)
        try:
            with self:
                yield self
        finally:
            torch.Tensor.tolist, torch.Tensor.cpu = tolist, cpu
            del world.batch, world.conditions


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


TINY = ["world.name=gmm", "train.batch_size=16", "train.log_every=1", "ema.warmup_steps=2", "train.threads=1",
        "train.checkpoint_every=100", "validation.every=0", "train.grad_accumulation=2"]


def _cfg(out, name, kind, *extra):
    roles = {"teacher": ["teacher"], "stage1": ["student"], "stage2": ["student", "critic"]}[kind]
    optim = [f"optim.{r}.{k}" for r in roles for k in ("warmup_steps=2", "lr=1e-3")]
    return resolve(None, [f"kind={kind}", f"train.out_dir={out / name}", *TINY, *optim, *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny gmm teacher (2 steps), then Stage 1 (3 steps) and Stage 2 (2 steps) from it, each with two
    micro-batches per step: the configs and the runs' folders."""
    out = tmp_path_factory.mktemp("chain")
    cfgs = {"t": _cfg(out, "t", "teacher", "train.steps=2", "model.network.hidden=32", "model.network.depth=1",
                      "train.grad_accumulation=1")}
    cfgs["s1"] = _cfg(out, "s1", "stage1", "train.steps=3", f"model.init={out / 't'}")
    cfgs["s2"] = _cfg(out, "s2", "stage2", "train.steps=2", f"model.init={out / 's1'}", "stage2.dmd_batch_size=4")
    for cfg in cfgs.values():
        train(cfg, progress=False)
    return out, cfgs


@pytest.mark.parametrize(("run", "phases"), [("s1", 1), ("s2", 2)])
def test_a_training_step_reads_the_device_once_per_phase(chain, run, phases):
    """Stage 1: one read (loss terms, gradient norm and every statistic together); Stage 2: one per phase
    (the student's, then the critic's), each before its optimizer step. The code before read 14 (Stage 1) and
    23 (Stage 2) times here: an ``.item()`` per statistic and micro-batch, plus the Stage-1 objective's own."""
    _, cfgs = chain
    trainer = build_trainer(cfgs[run], progress=False)
    trainer.train_step()   # the optimizer's state exists from here on
    method = trainer.method
    networks = [m for m in [*method.roles.values(), getattr(method, "teacher", None)] if isinstance(m, torch.nn.Module)]
    counter = DeviceSyncs(networks, method.world)
    with counter.watching():
        stats = trainer.train_step()
    assert len(counter.where) == phases, counter.where
    assert counter.where == [f"tolist at train/loop.py:{_fetch_line()}"] * phases
    assert all(type(v) is float for v in stats.values()), stats


def _fetch_line() -> int:
    import inspect

    from anystep.train.loop import Trainer

    lines, start = inspect.getsourcelines(Trainer._checked_fetch)
    return start + next(i for i, line in enumerate(lines) if ".tolist()" in line)


# metrics.csv of the chain above, written by the code before the statistics stayed on the device (an .item() per
# statistic and micro-batch), on a 2-core x86-64 CPU (AVX512 kernels), torch 2.13.0, one thread.
BEFORE = {
    "s1": [{'grad_norm/student': 0.980635941028595, 'loss/consistency_mse': 2.7571911811828613,
            'loss/diffusion_mse': 2.995896816253662, 'loss/free_mse': 2.2961926460266113,
            'loss/stage1': 2.7868422269821167, 'lr/student': 0.0005},
           {'grad_norm/student': 0.5541676878929138, 'loss/consistency_mse': 1.7788617014884949,
            'loss/diffusion_mse': 1.7262449264526367, 'loss/free_mse': 2.800126791000366,
            'loss/stage1': 1.4039013981819153, 'lr/student': 0.001},
           {'grad_norm/student': 1.246409296989441, 'loss/consistency_mse': 1.7875903248786926,
            'loss/diffusion_mse': 2.4216479063034058, 'loss/free_mse': 2.1232863664627075,
            'loss/stage1': 2.8883798718452454, 'lr/student': 0.001}],
    "s2": [{'dmd/fake_real_gap': 0.23399792611598969, 'dmd/grad_abs': 0.2865612879395485,
            'grad_norm/critic': 4.099932670593262, 'grad_norm/student': 1.3090523481369019,
            'loss/consistency_mse': 2.4179025888442993, 'loss/critic': 1.7053148746490479,
            'loss/diffusion_mse': 1.592659741640091, 'loss/dmd': 0.13388862839508195,
            'loss/free_mse': 3.1036128997802734, 'loss/stage1': 1.1041063070297241, 'lr/critic': 0.0005,
            'lr/student': 0.0005},
           {'dmd/fake_real_gap': 0.29530032724142075, 'dmd/grad_abs': 0.20239469408988953,
            'grad_norm/critic': 3.942875623703003, 'grad_norm/student': 1.3431062698364258,
            'loss/consistency_mse': 1.67015939950943, 'loss/critic': 2.2579461336135864,
            'loss/diffusion_mse': 2.406773805618286, 'loss/dmd': 0.06970600908886712,
            'loss/free_mse': 2.353591561317444, 'loss/stage1': 2.0191707611083984, 'lr/critic': 0.001,
            'lr/student': 0.001}],
}


@pytest.mark.parametrize("run", ["s1", "s2"])
def test_logged_statistics_are_the_ones_logged_before(chain, run):
    """Bit for bit where the CPU kernels are those the stored numbers came from; else to float tolerance."""
    out, _ = chain
    with open(out / run / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if k != "step" and not k.startswith("time/")}
                for r in csv.DictReader(f)]
    exact = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert [r.keys() for r in rows] == [r.keys() for r in BEFORE[run]]
    for got, before in zip(rows, BEFORE[run]):
        for k, v in before.items():
            assert got[k] == (v if exact else pytest.approx(v, rel=1e-5)), k
