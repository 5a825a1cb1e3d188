"""The flow map and any-step sampling.

A *flow-map model* returns the average velocity over [r, t]::

    u = model(x, t, r, cond)        x: (B, F, C, H, W), t, r: (B,) float32 timesteps in [0, 1000], t >= r

and one flow-map step is the paper's Euler update ``x_r = x_t - (t - r)/1000 * u``. At ``r = t`` the model
is an ordinary (instantaneous) velocity model, so a teacher is a flow-map model that ignores r.
``cond`` is whatever the world conditions on (class labels, text embeddings), batch-first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from . import rng
from .time import T_MAX, custom_grid, grid


class FlowMap(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: Any) -> torch.Tensor: ...


def euler_step(x: torch.Tensor, u: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x_r = x_t - (t - r)/1000 * u`` with per-sample t, r of shape (B,) (computed in float64)."""
    dt = ((t.double() - r.double()) / T_MAX).to(x.device, x.dtype)
    return x - dt.view(-1, *([1] * (x.ndim - 1))) * u


def noisy(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point on the straight path: ``x_t = (1 - t/1000) x0 + (t/1000) eps`` with per-sample t (B,)."""
    s = (t.double() / T_MAX).to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * eps


def endpoint(model: FlowMap, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """A flow map used as an endpoint (consistency) map: ``x0 = x_t - (t/1000) u(x_t, t, 0)``."""
    zero = torch.zeros_like(t)
    return euler_step(x, model(x, t.float(), zero.float(), cond), t, zero)


@runtime_checkable
class BatchCondition(Protocol):
    """A condition that is more than one batch-first tensor (a causal student's
    :class:`~anystep.causal.TeacherForcing`): it selects, concatenates and drops its own rows."""

    def take_rows(self, idx: torch.Tensor | slice) -> BatchCondition: ...

    def cat(self, other: BatchCondition) -> BatchCondition: ...

    def select(self, keep: torch.Tensor, null: BatchCondition) -> BatchCondition: ...


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditions along the batch (tensors, :class:`BatchCondition`; None stays None)."""
    if a is None and b is None:
        return None
    return a.cat(b) if isinstance(a, BatchCondition) else torch.cat([a, b], dim=0)


def take_rows(cond: Any, idx: torch.Tensor | slice) -> Any:
    """Rows ``idx`` of a batch-first condition (tensors, :class:`BatchCondition`; None stays None)."""
    if cond is None:
        return None
    return cond.take_rows(idx) if isinstance(cond, BatchCondition) else cond[idx]


def expand_cond(cond: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a single-row condition (e.g. the null prompt) to a batch."""
    return cond.expand(batch, *cond.shape[1:]) if cond.shape[0] == 1 else cond


def guided(model: FlowMap, scale: float, null_cond: Any) -> FlowMap:
    """Classifier-free guidance in the usual convention: ``u_null + w (u_cond - u_null)``, both branches in one
    batched call. ``scale = 1`` returns the model itself (no extra call)."""
    if scale == 1.0:
        return model

    def u(x, t, r, cond):
        b = x.shape[0]
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]),
                    cat_cond(cond, expand_cond(null_cond, b)))
        u_c, u_u = out[:b], out[b:]
        return u_u + scale * (u_c - u_u)

    return u


def sampling_grid(steps: int | Sequence[float], k: float = 5.0) -> torch.Tensor:
    """An int N gives the shifted N-step grid; a list gives a custom grid (timestep units)."""
    return grid(steps, k) if isinstance(steps, int) else custom_grid(steps)


@torch.no_grad()
def sample(model: FlowMap, noise: torch.Tensor, cond: Any, steps: int | Sequence[float] = 4, *,
           shift: float = 5.0, mean_velocity: bool = True,
           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Any-step flow-map sampling from noise at t = 1000 to data at t = 0.

    Each step is ``x <- x - (tau_i - tau_{i+1})/1000 * u(x, tau_i, r_i)`` with ``r_i = tau_{i+1}`` (the mean
    velocity over the step, AnyFlow) or ``r_i = tau_i`` when ``mean_velocity=False`` (plain Euler with the
    instantaneous velocity, the teacher's sampler).
    """
    taus = sampling_grid(steps, shift)
    if taus[0] != T_MAX:
        raise ValueError(f"sampling starts from pure noise at t = {T_MAX:g}; the grid starts at {taus[0]:g}")
    x = noise
    b = x.shape[0]
    for i in range(len(taus) - 1):
        t, r = taus[i].expand(b), taus[i + 1].expand(b)  # float64: the step size stays exact
        u = model(x, t.float(), (r if mean_velocity else t).float(), cond)
        x = euler_step(x, u, t, r)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_consistency(model: FlowMap, noise: torch.Tensor, cond: Any, steps: int | Sequence[float] = 4, *,
                       shift: float = 5.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multistep consistency sampling (the baselines' sampler): at each grid time predict x0 with the
    endpoint map, then re-noise it with fresh noise to the next grid time."""
    taus = sampling_grid(steps, shift)
    x, b = noise, noise.shape[0]
    for i in range(len(taus) - 1):
        x0 = endpoint(model, x, taus[i].expand(b), cond)
        if taus[i + 1] > 0:
            fresh = rng.noise_like(x, generator)
            x = noisy(x0, fresh, taus[i + 1].expand(b))
    return x0
