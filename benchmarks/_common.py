"""What the benchmarks share: the CPU setup, their inputs (the shapes world and its network, worlds of random
latents), methods made by the library's run kinds, the library's trainer timed step by step, and the ratio table.

Everything a benchmark times is the library's own: a method comes from :func:`anystep.kinds.kind`'s ``make``,
its roles are built by :mod:`anystep.models.zoo` or :class:`~anystep.models.roles.SharedBase`, and every
iteration is :meth:`anystep.train.loop.Trainer.train_step` with the kind's own optimizer and EMA settings. Only
the inputs (random latents, a fixed batch) and the measuring are the benchmarks'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from anystep import rng
from anystep.backward_simulation import RolloutPlan
from anystep.flowmap import take_rows
from anystep.kinds import Parts, kind, no_grad_frozen
from anystep.models import zoo
from anystep.models.architectures import ToyWanConfig
from anystep.train.loop import Trainer
from anystep.train.method import Method
from anystep.worlds import OnDevice
from anystep.worlds.base import ALL
from anystep.worlds.shapes import ShapesData


# --------------------------------------------------------------------------------------------------
# setup and inputs
# --------------------------------------------------------------------------------------------------
def cpu_setup(threads: int | None) -> None:
    """Threads (``None``: torch's default), denormal flushing and the global seed, as the CLI sets them."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)


def shapes_setup(threads: int | None) -> tuple[OnDevice, nn.Module]:
    """The shapes world (default config, on the CPU as a run puts it: ``OnDevice``) and a fresh velocity network
    of its family with the shipped teacher's sizes (``ToyWanConfig``: patch 1x4x4, 4 heads x 16, 4 layers,
    FFN 256), made by the zoo."""
    cpu_setup(threads)
    world = ShapesData()
    return OnDevice(world, torch.device("cpu")), zoo.velocity_network(world.network, ToyWanConfig(),
                                                                      world.network_inputs())


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class RandomLatents:
    """A world of random video latents ``(B, F, C, H, W)`` and text embeddings ``(B, L, D)`` (the null one all
    zeros), drawn on the CPU from the trainer's generator; :func:`random_world` puts it on a device with the
    library's :class:`~anystep.worlds.OnDevice`, as a training run does."""

    name, network = "random", "wan"

    def __init__(self, shape: tuple[int, int, int, int], text_len: int, text_dim: int):
        self.shape, self.text_shape = tuple(shape), (text_len, text_dim)
        self.null_cond = torch.zeros((1, text_len, text_dim))

    def batch(self, n: int, generator: torch.Generator, rows: slice = ALL) -> tuple[torch.Tensor, torch.Tensor]:
        return rng.normal((n, *self.shape), generator)[rows], self.conditions(n, generator, rows)

    def conditions(self, n: int, generator: torch.Generator, rows: slice = ALL) -> torch.Tensor:
        return rng.normal((n, *self.text_shape), generator)[rows]


def random_world(shape: tuple[int, int, int, int], text_len: int, text_dim: int, device: torch.device) -> OnDevice:
    return OnDevice(RandomLatents(shape, text_len, text_dim), device)


class FixedBatch:
    """A world that gives the same batch at every step (one drawn from ``world``): a step's cost without the
    cost of making its data."""

    def __init__(self, world: Any, n: int, generator: torch.Generator):
        self.source, self.data = world, world.batch(n, generator)
        self.null_cond = world.null_cond

    def batch(self, n: int, generator: torch.Generator, rows: slice = ALL) -> tuple[torch.Tensor, Any]:
        return self.data[0][rows], take_rows(self.data[1], rows)

    def conditions(self, n: int, generator: torch.Generator, rows: slice = ALL) -> Any:
        return take_rows(self.data[1], rows)

    def __getattr__(self, name: str):
        return getattr(self.source, name)


# --------------------------------------------------------------------------------------------------
# methods, from the library's run kinds
# --------------------------------------------------------------------------------------------------
def make_method(name: str, roles: dict[str, Any], world: Any, batch_size: int, **sections: Any) -> Method:
    """The method of kind ``name`` (``kind(name).make``) on ``roles``; the kind's config sections at their
    defaults except those given. Frozen roles get no gradient, as :func:`anystep.build.build_trainer` does."""
    spec = kind(name)
    frozen = {r.name for r in spec.roles if not r.trained}
    roles = {n: no_grad_frozen(m) if n in frozen else m for n, m in roles.items()}
    config = {s: sections[s] if s in sections else default() for s, default in spec.sections.items()}
    return spec.make(Parts(roles, world, batch_size, seed=0, sections=config))


def with_section(name: str, section: str, **changes: Any) -> Any:
    """Kind ``name``'s default ``section`` with ``changes`` (e.g. ``with_section("stage2", "stage2",
    rollout_steps=(4,))``)."""
    return dataclasses.replace(kind(name).sections[section](), **changes)


def pin_plan(method: Any, plan: RolloutPlan) -> Any:
    """A Stage-2 / CBS method whose rollouts all follow ``plan`` (the library's rollout, with the (N, k) it
    draws replaced): a fixed call count for timing."""
    rollout = method.rollout
    method.rollout = lambda noise, cond, _drawn, generator, part: rollout(noise, cond, plan, generator, part)
    return method


# --------------------------------------------------------------------------------------------------
# the library's trainer, timed
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def trainer_for(method: Method, kind_name: str, mixed_precision: str = "fp32",
                optim: dict[str, Any] | None = None) -> Iterator[Trainer]:
    """anystep's :class:`Trainer` on ``method`` with kind ``kind_name``'s optimizer of every trained role (with
    ``optim``'s changes, e.g. ``{"fused": True}``) and its product's EMA (as a run of that kind trains), writing
    nothing (a temporary run folder)."""
    spec = kind(kind_name)
    optims = {r: dataclasses.replace(spec.optim[r], **(optim or {})) for r in method.roles}
    with tempfile.TemporaryDirectory() as tmp:
        yield Trainer(method, steps=1, out_dir=tmp, optim=optims,
                      ema={spec.product: spec.ema}, seed=0, progress=False, mixed_precision=mixed_precision)


def step_times(trainer: Trainer, n: int, sync: Callable[[], None] = lambda: None,
               after: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds of each of ``n`` iterations ``trainer.train_step()`` (``sync`` around each; ``after`` once each
    has been timed)."""
    times = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - start)
        trainer.step += 1
        after()
    return times


def seconds_per_iter(method: Method, kind_name: str, iters: int, warmup: int = 2) -> float:
    """Mean seconds of ``iters`` trainer iterations after ``warmup`` untimed ones."""
    with trainer_for(method, kind_name) as trainer:
        step_times(trainer, warmup)
        return sum(step_times(trainer, iters)) / iters


def print_ratio_table(times: dict[str, float], first: str, width: int, seconds_width: int) -> None:
    """Rows ``name  s/iter  x base`` (the base: the first row), under a header whose first cell is ``first``."""
    base = next(iter(times.values()))
    print(f"{first:<{width}}{'s/iter':>{seconds_width}}{'x flow matching':>18}")
    for name, t in times.items():
        print(f"{name:<{width}}{t:>{seconds_width}.3f}{t / base:>18.2f}")
