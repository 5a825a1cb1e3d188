"""Backward simulation: the student's own samples, produced the way it samples, with gradients.

Stage 2 scores what the student *generates*, not what it sees in Stage 1. A rollout draws a number of
steps N and a step k of the N-step grid ``tau_0 = 1000 > tau_1 > ... > tau_N = 0`` and simulates it from
fresh noise.

* **Flow-map backward simulation** (AnyFlow, official ``training_rollout``): a flow map can jump, so the
  rollout is at most three calls whatever N is: ``tau_0 -> tau_k`` (skipped when k = 0), the fine step
  ``tau_k -> tau_k+1``, and ``tau_k+1 -> 0`` (skipped when k = N - 1). Gradients flow through every executed
  call (official); ``grad="one"`` keeps the gradient of the fine step only (FastVideo's port).
* **Consistency backward simulation** (Self-Forcing / rCM style, the baseline): an endpoint map predicts
  x0 and re-noises with fresh noise to the next grid time; steps 0..k-1 run without gradient and the
  output is step k's x0 prediction, with gradient. Its cost grows with k, so with N.

The (N, k) draw comes from a dedicated generator and, under torch.distributed, is broadcast from rank 0 so
that every process simulates the same step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import rng
from .flowmap import FlowMap, endpoint, euler_step, noisy
from .time import grid

if TYPE_CHECKING:
    from .global_batch import Part


@dataclass(frozen=True)
class RolloutPlan:
    """Simulate step ``k`` (0 <= k < n) of the n-step grid."""

    n: int
    k: int

    def __post_init__(self):
        if self.n < 1 or not 0 <= self.k < self.n:
            raise ValueError(f"a rollout needs n >= 1 and 0 <= k < n, got n={self.n}, k={self.k}")


def draw_plan(choices: Sequence[int], generator: torch.Generator) -> RolloutPlan:
    """N uniform over ``choices`` (official {2, 4, 8, 16, 50}), k uniform over [0, N). Same on every rank."""
    if not choices or min(choices) < 1:
        raise ValueError(f"rollout step choices must be integers >= 1, got {list(choices)}")
    n = int(choices[int(rng.integers(0, len(choices), (1,), generator))])
    k = int(rng.integers(0, n, (1,), generator))
    if dist.is_available() and dist.is_initialized():
        nk = torch.tensor([n, k], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(nk, src=0)
        n, k = int(nk[0]), int(nk[1])
    return RolloutPlan(n, k)


def flowmap_segments(plan: RolloutPlan, shift: float = 5.0) -> list[tuple[float, float, bool]]:
    """The executed calls as (t, r, is_fine_step): tau_0 -> tau_k, tau_k -> tau_k+1, tau_k+1 -> 0."""
    taus = grid(plan.n, shift)
    t_k, t_k1 = float(taus[plan.k]), float(taus[plan.k + 1])
    segments = [(float(taus[0]), t_k, False), (t_k, t_k1, True), (t_k1, 0.0, False)]
    return [s for s in segments if s[0] > s[1]]


def flowmap_backward_simulation(model: FlowMap, noise: torch.Tensor, cond: Any, plan: RolloutPlan, *,
                                shift: float = 5.0, grad: str = "all") -> torch.Tensor:
    """Roll the flow map out from ``noise`` (at t = 1000) to a sample, in <= 3 Euler flow-map jumps.

    ``grad="all"``: autograd through every call (official). ``grad="one"``: only the fine step's call is
    differentiated; the other calls' outputs are constants (the sample still reaches t = 0).
    """
    if grad not in ("all", "one"):
        raise ValueError(f"rollout gradient must be 'all' or 'one', got {grad!r}")
    x = noise
    b = noise.shape[0]
    for t, r, fine in flowmap_segments(plan, shift):
        tt, rr = (torch.full((b,), v, dtype=torch.float64, device="cpu") for v in (t, r))
        with torch.set_grad_enabled(torch.is_grad_enabled() and (grad == "all" or fine)):
            u = model(x, tt.float(), rr.float(), cond)
        x = euler_step(x, u, tt, rr)
    return x


def consistency_backward_simulation(model: FlowMap, noise: torch.Tensor, cond: Any, plan: RolloutPlan, *,
                                    shift: float = 5.0, generator: torch.Generator | None = None,
                                    part: Part | None = None) -> torch.Tensor:
    """Predict x0 and re-noise along the n-step grid; k no-grad steps, then step k's x0 with gradient
    (``noise``: a ``part``'s rows of the rollout batch)."""
    taus = grid(plan.n, shift)
    b = noise.shape[0]
    x = noise
    for i in range(plan.k + 1):
        t = taus[i].expand(b)
        with torch.set_grad_enabled(torch.is_grad_enabled() and i == plan.k):
            x0 = endpoint(model, x, t, cond)
        if i < plan.k:
            fresh = rng.noise_like(x, generator, part)
            x = noisy(x0, fresh, taus[i + 1].expand(b))
    return x0
