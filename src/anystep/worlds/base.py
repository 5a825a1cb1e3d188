"""What a world is to the rest of anystep: a source of training batches (:class:`World`), and, where it has
one, an exact judge of samples (:class:`Judge`).

The algorithms, the trainer and the sweep see only these protocols. A world draws its data on the CPU from a
CPU generator (the same numbers on every device); :class:`OnDevice` moves its batches to the training device,
and judges score CPU copies of the samples. ``batch`` and ``conditions`` draw a global batch of ``n`` and return
its ``rows`` (a process's share, :mod:`anystep.global_batch`); a world may load only those rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..flowmap import FlowMap, take_rows

ALL = slice(None)   # every row of a batch


@dataclass
class EvalSet:
    """Fixed noises and conditions for sampling, and what the judge needs to score them (labels, clip specs)."""

    noise: torch.Tensor   # (n, F, C, H, W)
    cond: Any             # batch-first condition
    meta: Any             # what the judge needs, one entry per sample

    def head(self, n: int) -> EvalSet:
        """The first ``n`` samples."""
        return EvalSet(self.noise[:n], take_rows(self.cond, slice(n)), self.meta[:n])


@runtime_checkable
class Judge(Protocol):
    """Scores samples of a world exactly. ``picture`` says how samples are shown: ``"video"`` (a labelled grid
    video, ``picture_samples`` clips per row), ``"decoded video"`` (the same of the judge's ``decode(samples)``,
    for latent samples: the real path) or ``"scatter"`` (the first two coordinates of ``picture_samples``
    samples, coloured by class, :meth:`marks` as crosses)."""

    primary_metric: str
    higher_is_better: bool
    picture: str
    picture_samples: int

    def score(self, samples: torch.Tensor, ev: EvalSet, guidance: float = 1.0,
              chunk_partition: tuple[int, ...] | None = None) -> dict[str, float]:
        """Batch-mean metrics of ``samples`` (B, F, C, H, W) on the CPU, made from ``ev``'s noises and
        conditions. ``guidance``: the CFG scale the samples are meant to follow (an exact ODE's reference);
        ``chunk_partition``: a causal student's chunks, for per-chunk scores."""

    def labels(self, ev: EvalSet) -> list[str]:
        """A short label per sample (a grid's column titles)."""

    def marks(self) -> torch.Tensor:
        """Points to mark on a scatter (``(M, D)``; none, ``(0, D)``, for a video judge)."""


@runtime_checkable
class World(Protocol):
    """A source of training data. ``network`` names its family in :mod:`anystep.models.zoo` and
    ``network_inputs`` what that family needs of the world (shape, classes, text width, a model folder)."""

    name: str
    network: str
    content: str          # what samples are: 'videos' (pixels in [-1, 1]) or 'latents'
    null_cond: Any

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    def network_inputs(self) -> dict[str, Any]: ...

    def batch(self, n: int, generator: torch.Generator, rows: slice = ALL) -> tuple[torch.Tensor, Any]: ...

    def conditions(self, n: int, generator: torch.Generator, rows: slice = ALL) -> Any: ...

    def eval_set(self, n: int, seed: int) -> EvalSet: ...

    def exact_teacher(self) -> FlowMap | None: ...

    def judge(self) -> Judge | None: ...


class OnDevice:
    """A world whose batches, conditions and null condition live on ``device`` (the data itself is made on the
    CPU, from the CPU generator, so a run draws the same data on every device)."""

    def __init__(self, world: World, device: torch.device):
        self.source, self.device = world, torch.device(device)
        self.null_cond = _to(world.null_cond, self.device)

    def batch(self, n: int, generator: torch.Generator, rows: slice = ALL) -> tuple[torch.Tensor, Any]:
        x0, cond = self.source.batch(n, generator, rows)
        return x0.to(self.device), _to(cond, self.device)

    def conditions(self, n: int, generator: torch.Generator, rows: slice = ALL) -> Any:
        return _to(self.source.conditions(n, generator, rows), self.device)

    def __getattr__(self, name: str):
        return getattr(self.source, name)


def _to(cond: Any, device: torch.device) -> Any:
    return cond.to(device) if isinstance(cond, torch.Tensor) else cond
