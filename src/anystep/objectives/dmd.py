"""Distribution matching (DMD2) on the student's rollouts: AnyFlow Stage 2's generator loss.

As the official ``_compute_kl_grad`` computes it, for a rollout sample x^ (with gradient)::

    tau      = 1000 time_shift(sigma),  sigma ~ U(0, 1)          one per sample
    z        = (1 - tau/1000) sg(x^) + (tau/1000) n          re-noised rollout
    x0_fake  = z - (tau/1000) f_critic(z, tau)               the critic's clean estimate
    x0_c/u   = z - (tau/1000) f_teacher(z, tau | prompt / null)
    x0_real  = x0_c + s (x0_c - x0_u)                        s = 3, i.e. CFG 4 in the usual u + w (c - u) form
    g        = (x0_fake - x0_real) / mean|x^ - x0_real|      per-sample normaliser (DMD2)
    L_DMD    = mean((x^ - sg(x^ - g))^2)                     float64; dL/dx^ = 2 g / numel

Minimising it moves the samples along ``x0_real - x0_fake``: from where the student's distribution is
(the critic) toward where the teacher's is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import rng
from ..flowmap import FlowMap, cat_cond, euler_step, expand_cond, noisy
from ..time import T_MAX, time_shift

if TYPE_CHECKING:
    from ..global_batch import Part


def dmd_times(batch: int, shift: float = 5.0, generator: torch.Generator | None = None, min_t: float = 0.0,
              max_t: float = T_MAX, part: Part | None = None) -> torch.Tensor:
    """One DMD time per sample: ``clamp(1000 time_shift(U(0, 1)), min_t, max_t)`` (official: min 0, max 1000)."""
    u = rng.uniform(batch, generator, dtype=torch.float64, part=part)
    return (T_MAX * time_shift(u, shift)).clamp(min_t, max_t)


def x0_from_velocity(z: torch.Tensor, tau: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """One Euler jump from tau to 0: ``z - (tau/1000) v``."""
    return euler_step(z, velocity, tau, torch.zeros_like(tau))


def real_x0(x0_cond: torch.Tensor, x0_null: torch.Tensor, scale: float) -> torch.Tensor:
    """The teacher's guided estimate in the official form ``c + s (c - u)`` (s = 3 is "CFG 4")."""
    return x0_cond + scale * (x0_cond - x0_null)


def dmd_gradient(x_hat: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """``(x0_fake - x0_real) / mean|x^ - x0_real|`` per sample; NaN/inf entries become 0 (official)."""
    dims = tuple(range(1, x_hat.ndim))
    norm = (x_hat - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / norm)


def dmd_mse(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``mean((x^ - sg(x^ - g))^2)`` in float64: its gradient with respect to x^ is ``2 g / numel``."""
    x = x_hat.double()
    return (x - (x - grad.double()).detach()).pow(2).mean()


def dmd_loss(x_hat: torch.Tensor, critic: FlowMap, teacher: FlowMap, cond: Any, null_cond: Any, *,
             guidance: float = 3.0, shift: float = 5.0, time_range: tuple[float, float] = (0.0, T_MAX),
             generator: torch.Generator | None = None,
             part: Part | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The DMD generator loss for rollout samples ``x_hat`` (B, F, C, H, W; a ``part``'s rows) with gradient. The
    critic and the teacher are velocity models (called with r = t) and run without gradient."""
    b = x_hat.shape[0]
    with torch.no_grad():
        tau = dmd_times(b, shift, generator, *time_range, part=part)
        n = rng.noise_like(x_hat, generator, part)
        z = noisy(x_hat.detach(), n, tau)
        t = tau.float()
        x0_fake = x0_from_velocity(z, tau, critic(z, t, t, cond))
        if guidance != 0.0:
            both = teacher(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]),
                           cat_cond(cond, expand_cond(null_cond, b)))
            x0_real = real_x0(x0_from_velocity(z, tau, both[:b]), x0_from_velocity(z, tau, both[b:]), guidance)
        else:
            x0_real = x0_from_velocity(z, tau, teacher(z, t, t, cond))
        grad = dmd_gradient(x_hat.detach(), x0_fake, x0_real)
    loss = dmd_mse(x_hat, grad)
    stats = {"loss/dmd": loss.detach(), "dmd/grad_abs": grad.abs().mean(),
             "dmd/fake_real_gap": (x0_fake - x0_real).pow(2).mean().sqrt()}
    return loss, stats
