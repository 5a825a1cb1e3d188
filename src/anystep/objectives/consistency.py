"""Consistency distillation: the baseline's endpoint map (an N-step consistency model, sampled by
predict-x0-then-re-noise).

The student is the same flow-map network queried at r = 0, so its endpoint map
``f(x_t, t) = x_t - (t/1000) u(x_t, t, 0)`` satisfies the boundary condition f(x, 0) = x by construction.
Discrete-time consistency distillation on a grid of M intervals ``tau_0 = 1000 > ... > tau_M = 0``::

    x_t  = (1 - t/1000) x0 + (t/1000) eps,          t = tau_i,  s = tau_i+1 (i uniform)
    x_s  = x_t - ((t - s)/1000) v_teacher(x_t, t)    one (guided) teacher Euler step
    L    = mean((f(x_t, t) - sg f(x_s, s))^2)         target from the current weights (iCT-style, no EMA)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import rng
from ..flowmap import FlowMap, endpoint, euler_step, noisy
from ..time import grid

if TYPE_CHECKING:
    from ..global_batch import Part


def consistency_pairs(batch: int, intervals: int, shift: float = 5.0,
                      generator: torch.Generator | None = None,
                      part: Part | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjacent grid times (t, s), t > s, one pair per sample, float64."""
    taus = grid(intervals, shift)
    i = rng.integers(0, intervals, batch, generator, part=part).cpu()
    return taus[i], taus[i + 1]


def consistency_distillation_loss(student: FlowMap, teacher: FlowMap, x0: torch.Tensor, cond: Any, *,
                                  intervals: int = 32, shift: float = 5.0,
                                  generator: torch.Generator | None = None,
                                  part: Part | None = None) -> tuple[torch.Tensor, dict]:
    """The loss on a batch of real data (a ``part``'s rows); ``teacher`` is the (guided) velocity model."""
    t, s = consistency_pairs(x0.shape[0], intervals, shift, generator, part)
    eps = rng.noise_like(x0, generator, part)
    x_t = noisy(x0, eps, t)
    with torch.no_grad():
        x_s = euler_step(x_t, teacher(x_t, t.float(), t.float(), cond), t, s)
        target = endpoint(student, x_s, s, cond)
    pred = endpoint(student, x_t, t, cond)
    loss = (pred.float() - target.float()).pow(2).mean()
    return loss, {"loss/consistency": loss.detach()}
