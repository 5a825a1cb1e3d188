"""Time in AnyFlow: the shift, N-step grids, the (t, r) sampler, loss weights.

Conventions (used by every module of anystep):

* Rectified flow ``x_t = (1 - s) x0 + s eps`` with ``s = t / 1000``; data velocity ``v = eps - x0``.
* Times are in *timestep units* ``[0, 1000]`` at every model boundary, ``t >= r``, and are kept in
  float32/float64 in the math (the official code's bf16 times are a known flaw; ``time_dtype`` in the
  Stage-1 config can emulate them).
* time_shift(s) = k s / (1 + (k - 1) s) with the shift factor k (``shift`` in every config and signature;
  5 by default, Wan / SD3's).
* Grids, time pairs and tables are made on the CPU (float64 math, from CPU generators; see :mod:`anystep.rng`);
  the caller moves them to the data's device. :func:`beta08_weight` answers on the device of its ``t``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import rng

if TYPE_CHECKING:
    from .global_batch import Part

T_MAX = 1000.0
CPU = torch.device("cpu")


def time_shift(s: torch.Tensor | float, shift: float = 5.0) -> torch.Tensor:
    """The time shift ``k s / (1 + (k - 1) s)``, k = ``shift``; monotone on [0, 1], 0 -> 0 and 1 -> 1."""
    k = shift
    s = torch.as_tensor(s, dtype=torch.float64, device=CPU) if not torch.is_tensor(s) else s
    return k * s / (1 + (k - 1) * s)


def grid(num_steps: int, shift: float = 5.0) -> torch.Tensor:
    """The N-step inference grid ``tau_i = 1000 time_shift(1 - i/N)``, i = 0..N, terminal 0 included.

    Equal to diffusers' ``FlowMapEulerDiscreteScheduler(shift=shift).set_timesteps(N)``: its ``timesteps``
    are ``tau_0..tau_{N-1}`` and its ``sigmas * 1000`` are all N + 1 values. Float64.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"number of sampling steps must be an integer >= 1, got {num_steps!r}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=CPU)
    taus = T_MAX * time_shift(s, shift)
    taus[-1] = 0.0
    return taus


def custom_grid(timesteps: Sequence[float]) -> torch.Tensor:
    """A user-given grid in timestep units; strictly decreasing, within [0, 1000]. A terminal 0 is appended
    when missing (as diffusers does for custom schedules)."""
    taus = torch.as_tensor(list(timesteps), dtype=torch.float64, device=CPU)
    if taus.ndim != 1 or taus.numel() < 1:
        raise ValueError("a custom grid needs at least one timestep")
    if taus[-1] != 0:
        taus = torch.cat([taus, taus.new_zeros(1)])
    if (taus < 0).any() or (taus > T_MAX).any():
        raise ValueError(f"grid timesteps must lie in [0, {T_MAX:g}], got {taus.tolist()}")
    if not (taus[:-1] > taus[1:]).all():
        raise ValueError(f"grid timesteps must be strictly decreasing, got {taus.tolist()}")
    return taus


def logit_normal(n: int, shift: float = 5.0, mean: float = 0.0, std: float = 1.0,
                 generator: torch.Generator | None = None, part: Part | None = None) -> torch.Tensor:
    """Flow-matching training times: ``1000 time_shift(sigmoid(N(mean, std)))`` (teacher and critic), float32;
    ``n`` times (a ``part``'s rows of the global batch)."""
    z = rng.normal(n, generator, dtype=torch.float64, part=part) * std + mean
    return (T_MAX * time_shift(torch.sigmoid(z), shift)).float()


# --------------------------------------------------------------------------------------------------
# The Stage-1 (t, r) sampler with its three buckets
# --------------------------------------------------------------------------------------------------
DIFFUSION, CONSISTENCY, FREE = 0, 1, 2


@dataclass
class TimePairs:
    """A batch of (t, r) in timestep units, float32, with each sample's bucket."""

    t: torch.Tensor       # (B,)
    r: torch.Tensor       # (B,)
    bucket: torch.Tensor  # (B,) long: DIFFUSION (r = t), CONSISTENCY (r = 0), FREE

    @property
    def is_diffusion(self) -> torch.Tensor:
        return self.bucket == DIFFUSION


def check_bucket_ratios(diffusion: float, consistency: float) -> None:
    """Both ratios >= 0 and their sum <= 1 (the rest is the free bucket), or a ValueError naming them."""
    if not (diffusion >= 0 and consistency >= 0 and diffusion + consistency <= 1):
        raise ValueError(f"bucket ratios must be >= 0 and sum to <= 1 (the rest is free), got diffusion "
                         f"{diffusion} + consistency {consistency}")


def assign_buckets(batch: int, diffusion: float = 0.5, consistency: float = 0.25, *,
                   split: str = "stratified", part: Part | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Which bucket each sample of a batch falls in (with ``part``: of the global batch, cut to the part's
    ``batch`` rows; see :mod:`anystep.global_batch`).

    ``split="official"``: the official code's rule, by index g in a global batch of G: ``g < round(0.5 G)`` is
    diffusion, the next ``round(0.25 G)`` consistency, the rest free. With one micro-batch per process, g =
    rank * B + i as in the official code: buckets depend on rank order, and a batch of 1 on one process always
    lands in the same bucket.

    ``split="stratified"`` (default, independent of rank): systematic sampling with a random offset over the
    global batch, ``u_i = (o + i) / G mod 1``, bucket = the interval of [0, 1) that u_i falls in, then a random
    permutation. The global batch gets exactly the rounded proportions however it is split over processes and
    micro-batches, and a batch of 1 draws each bucket with its probability over training.
    """
    check_bucket_ratios(diffusion, consistency)
    total = batch if part is None else batch * part.count
    if split == "official":
        g_index = torch.arange(total, device=CPU)
        n_diff, n_cons = round(diffusion * total), round(consistency * total)
        bucket = torch.full((total,), FREE, dtype=torch.long, device=CPU)
        bucket[g_index < n_diff + n_cons] = CONSISTENCY
        bucket[g_index < n_diff] = DIFFUSION
        return bucket if part is None else part.take(bucket, total)
    if split != "stratified":
        raise ValueError(f"unknown bucket split {split!r}; expected 'stratified' or 'official'")
    offset = rng.uniform((), generator, dtype=torch.float64).to(CPU)
    u = ((offset + torch.arange(total, dtype=torch.float64, device=CPU)) / total) % 1.0
    bucket = torch.full((total,), FREE, dtype=torch.long, device=CPU)
    bucket[u < diffusion + consistency] = CONSISTENCY
    bucket[u < diffusion] = DIFFUSION
    bucket = bucket[rng.permutation(total, generator).to(CPU)]
    return bucket if part is None else part.take(bucket, total)


def sample_time_pairs(batch: int, shift: float = 5.0, diffusion: float = 0.5, consistency: float = 0.25, *,
                      split: str = "stratified", part: Part | None = None,
                      generator: torch.Generator | None = None,
                      time_dtype: torch.dtype = torch.float32) -> TimePairs:
    """Stage-1 (t, r): ``t = max(u1, u2)``, ``r = min(u1, u2)``, buckets (diffusion: r = t; consistency:
    r = 0; free: as drawn), then both shifted and scaled to timestep units. ``time_dtype=torch.bfloat16``
    reproduces the official code's bf16 times (its ``torch.rand(dtype=bf16)`` and bf16 shift). With ``part``:
    the pairs of the part's ``batch`` rows of the global batch."""
    bucket = assign_buckets(batch, diffusion, consistency, split=split, part=part, generator=generator)
    u = rng.uniform((batch, 2), generator, part=part).to(CPU, time_dtype)
    t, r = u.max(dim=1).values, u.min(dim=1).values
    r = torch.where(bucket == DIFFUSION, t, r)
    r = torch.where(bucket == CONSISTENCY, torch.zeros_like(r), r)
    t = (T_MAX * time_shift(t, shift)).to(time_dtype)
    r = (T_MAX * time_shift(r, shift)).to(time_dtype)
    return TimePairs(t=t.float(), r=r.float(), bucket=bucket)


# --------------------------------------------------------------------------------------------------
# Loss weight
# --------------------------------------------------------------------------------------------------
# The loss weights w(t) of the paper's time-sampler ablation (Fig. 6b), as densities of the shifted sigma g
# (unnormalised): Beta(2, 1.5), the official 'beta08', and Normal(0.5, 0.25); 'uniform' is no weight.
WEIGHT_DENSITIES = {
    "beta08": lambda g: g * (1 - g).clamp_min(0).sqrt(),
    "normal": lambda g: torch.exp(-0.5 * ((g - 0.5) / 0.25) ** 2),
}


def weight_table(kind: str, shift: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss-weight table as the official ``beta08`` one is made: the density ``WEIGHT_DENSITIES[kind]`` on
    the 1001 shifted grid points ``g_j = time_shift(j/1000)``, scaled so that the weights sum to 1000.
    Returns (grid in timestep units, weights), float64."""
    g = time_shift(torch.linspace(0.0, 1.0, 1001, dtype=torch.float64, device=CPU), shift)
    y = WEIGHT_DENSITIES[kind](g)
    return T_MAX * g, y * (1000.0 / y.sum())


def loss_weight(t: torch.Tensor, kind: str, shift: float = 5.0) -> torch.Tensor:
    """Nearest-grid lookup of weight ``kind`` at timesteps ``t`` (r plays no part), float32, on ``t``'s
    device."""
    g, w = (v.to(t.device) for v in weight_table(kind, shift))
    idx = (t.double()[:, None] - g[None, :]).abs().argmin(dim=1)
    return w[idx].float()


def beta08_table(shift: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``beta08`` loss-weight table: ``y = g (1 - g)^0.5`` (an unnormalised Beta(2, 1.5) density
    in shifted sigma) on the shifted grid, summing to 1000 (:func:`weight_table`)."""
    return weight_table("beta08", shift)


def beta08_weight(t: torch.Tensor, shift: float = 5.0) -> torch.Tensor:
    """The beta08 weight at timesteps ``t`` (:func:`loss_weight`)."""
    return loss_weight(t, "beta08", shift)
