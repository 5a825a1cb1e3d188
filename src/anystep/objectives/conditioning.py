"""Condition dropout (the null condition stands in for a dropped prompt or label)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import rng
from ..flowmap import BatchCondition

if TYPE_CHECKING:
    from ..global_batch import Part


def select_cond(keep: torch.Tensor, cond: Any, null_cond: Any) -> Any:
    """Row-wise ``cond if keep else null_cond``; ``null_cond`` may have batch 1. Works on tensors and
    :class:`~anystep.flowmap.BatchCondition` (which select their own rows)."""
    if isinstance(cond, BatchCondition):
        return cond.select(keep, null_cond)
    null_cond = null_cond.to(cond.device).expand_as(cond) if null_cond.shape[0] == 1 else null_cond
    mask = keep.to(cond.device).view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(mask, cond, null_cond)


def drop_condition(cond: Any, null_cond: Any, p: float, batch: int,
                   generator: torch.Generator | None = None, part: Part | None = None) -> tuple[Any, torch.Tensor]:
    """Replace each row of ``cond`` by the null condition with probability ``p`` (official: 0.1, with Wan's
    negative-prompt embedding as the null). Returns the new condition and the keep mask (B,) bool. ``batch``:
    the rows of ``cond`` (a ``part``'s rows of the global batch)."""
    keep = rng.uniform(batch, generator, part=part) >= p
    return select_cond(keep, cond, null_cond), keep
