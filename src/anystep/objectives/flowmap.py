"""Stage 1: forward flow-map training (the MeanFlow identity on real data, AnyFlow sec. 3).

For a sample x0, noise eps, v = eps - x0 and a pair t >= r::

    target = v - (t - r) dF/dt                         (MeanFlow identity, timestep units)
    F~     = (F_c - (1 - w) sg(F_u)) / w               (guidance fusion, w = 3)
    L_i    = beta08(t_i) * mean((F~_i - sg(target_i))^2)
    L_i   <- L_i * sg(mean_diffusion / (L_i + c))^p    (non-diffusion samples; adaptive rebalance, p = 1)

dF/dt is the total derivative of the conditional output along the data path (dx/dt = v / 1000 per
timestep unit, r fixed), divided by w: a central difference of the student itself (official, eps = 5
timestep units) or an exact JVP (``derivative="jvp"``). Both are stop-gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .. import rng
from ..flowmap import FlowMap, cat_cond, expand_cond, take_rows
from ..time import T_MAX, check_bucket_ratios, loss_weight, sample_time_pairs
from .conditioning import drop_condition
from .flow_matching import noisy

if TYPE_CHECKING:
    from ..global_batch import Part


@dataclass
class Stage1Config:
    """The Stage-1 objective. Defaults reproduce the official recipe unless marked *departure*."""

    fuse_guidance_scale: float | None = 3.0  # w; None or 1 disables fusion (no unconditional call)
    cond_dropout: float = 0.1                # rows replaced by the null condition
    diffusion_ratio: float = 0.5             # r = t
    consistency_ratio: float = 0.25          # r = 0; the rest is "free"
    bucket_split: str = "stratified"         # departure (required): 'official' ties buckets to rank order
    shift: float = 5.0
    derivative: str = "central_difference"   # or 'jvp' (departure: exact forward-mode derivative)
    epsilon: float = 5.0                     # central-difference step, timestep units
    fd_boundary: str = "one_sided"           # departure: 'none' steps outside [r, 1000] like the official code
    weight_type: str = "beta08"              # w(t): Beta(2, 1.5); or 'normal' (0.5, 0.25), 'uniform' (Fig. 6b)
    rebalance_eps: float = 1e-5
    rebalance_power: float = 1.0             # p of the adaptive rebalance; 0 = none (plain MSE); departure when < 1
    time_dtype: str = "float32"              # departure: 'bfloat16' emulates the official bf16 times
    # causal (FAR) students only (official sec. 5.4):
    long_context_ratio: float = 0.5          # P(K ~ U{limit..chunks}), else K = limit chunks
    bidirectional_prob: float = 0.1          # P(an extra bidirectional flow-matching loss); Stage 2: 0

    def __post_init__(self):
        choices = {"derivative": ("central_difference", "jvp"), "fd_boundary": ("one_sided", "none"),
                   "weight_type": ("beta08", "normal", "uniform"), "bucket_split": ("stratified", "official"),
                   "time_dtype": ("float32", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"stage1.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.epsilon <= 0:
            raise ValueError(f"stage1.epsilon must be > 0 timestep units, got {self.epsilon}")
        check_bucket_ratios(self.diffusion_ratio, self.consistency_ratio)
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"stage1.cond_dropout must lie in [0, 1], got {self.cond_dropout}")
        for name in ("long_context_ratio", "bidirectional_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"stage1.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.rebalance_power <= 1.0:
            raise ValueError(f"stage1.rebalance_power must be in [0, 1], got {self.rebalance_power}")


# ------------------------------------------------------------------------------------------------
# The formulas, one function each
# ------------------------------------------------------------------------------------------------
def meanflow_target(v: torch.Tensor, t: torch.Tensor, r: torch.Tensor, dudt: torch.Tensor) -> torch.Tensor:
    """``v - (t - r) dF/dt`` with t, r (B,) in timestep units and dF/dt per timestep unit."""
    return v - _bcast(t - r, v) * dudt


def fuse_guidance(u_cond: torch.Tensor, u_null: torch.Tensor, w: float) -> torch.Tensor:
    """``(F_c - (1 - w) sg(F_u)) / w``: the regressed quantity, so that F_c learns ``F_u + w (F~ - F_u)``."""
    return (u_cond - (1 - w) * u_null.detach()) / w


def fd_steps(t: torch.Tensor, r: torch.Tensor, eps: float, one_sided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward step sizes (h+, h-) of the difference at t. Central (eps, eps) inside the domain;
    one-sided at the edges: h+ = min(eps, 1000 - t), h- = min(eps, t - r)."""
    h_plus, h_minus = torch.full_like(t, eps), torch.full_like(t, eps)
    if one_sided:
        h_plus = torch.minimum(h_plus, T_MAX - t)
        h_minus = torch.minimum(h_minus, t - r)
    return h_plus, h_minus


def difference_quotient(u_plus: torch.Tensor, u_minus: torch.Tensor, h_plus: torch.Tensor,
                        h_minus: torch.Tensor) -> torch.Tensor:
    """``(F(t + h+) - F(t - h-)) / (h+ + h-)``; zero where both steps vanish (t = r = 1000)."""
    span = h_plus + h_minus
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(_bcast(span > 0, u_plus), (u_plus - u_minus) / _bcast(safe, u_plus), 0.0)


def rebalance(losses: torch.Tensor, is_diffusion: torch.Tensor, diffusion_mean: torch.Tensor,
              c: float = 1e-5, power: float = 1.0) -> torch.Tensor:
    """Non-diffusion samples: ``L_i * sg(mean_diffusion / (L_i + c))^p`` (p = 1, official: value ~
    mean_diffusion, gradient scaled down by the sample's own loss; p < 1 only partly, as MeanFlow's adaptive
    weight's power; p = 0 leaves the loss as it is). Diffusion samples unchanged."""
    scale = (diffusion_mean / (losses.detach() + c)).detach().pow(power)
    return torch.where(is_diffusion, losses, losses * scale)


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.to(like.dtype if a.dtype.is_floating_point else a.dtype).view(-1, *([1] * (like.ndim - 1)))


# ------------------------------------------------------------------------------------------------
# The derivative: central difference (official) or exact JVP
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def central_difference_and_null(model: FlowMap, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                                r: torch.Tensor, cond: Any, null_cond: Any | None, eps: float,
                                one_sided: bool, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dF_c/dt by a difference quotient along the data path, and the unconditional output F_u, in **one**
    batched no-grad call: [null branch (B) | plus points | minus points]. Only samples with ``need`` (t > r;
    at t = r the derivative is multiplied by 0) get difference points; ``need`` is best a host tensor (the drawn
    pairs'): choosing the rows then does not wait for the device."""
    h_plus, h_minus = fd_steps(t, r, eps, one_sided)
    idx = torch.nonzero(need).flatten().to(x_t.device)
    xs, ts, rs, cs = [], [], [], []
    if null_cond is not None:
        xs.append(x_t), ts.append(t), rs.append(r), cs.append(null_cond)
    if idx.numel():
        xi, vi, ti, ri, ci = x_t[idx], v[idx], t[idx], r[idx], take_rows(cond, idx)
        hp, hm = h_plus[idx], h_minus[idx]
        xs += [xi + _bcast(hp / T_MAX, vi) * vi, xi - _bcast(hm / T_MAX, vi) * vi]
        ts += [ti + hp, ti - hm]
        rs += [ri, ri]
        cs += [ci, ci]
    dudt = torch.zeros_like(x_t)
    if not xs:
        return dudt, None
    cond_all = cs[0]
    for c in cs[1:]:
        cond_all = cat_cond(cond_all, c)
    out = model(torch.cat(xs), torch.cat(ts), torch.cat(rs), cond_all)
    b = x_t.shape[0] if null_cond is not None else 0
    u_null = out[:b] if null_cond is not None else None
    if idx.numel():
        n = idx.numel()
        u_plus, u_minus = out[b:b + n], out[b + n:b + 2 * n]
        dudt[idx] = difference_quotient(u_plus, u_minus, h_plus[idx], h_minus[idx]).to(dudt.dtype)
    return dudt, u_null


def exact_derivative(model: FlowMap, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                     cond: Any) -> torch.Tensor:
    """dF_c/dt by forward-mode AD: ``jvp(F, (x, t), (v / 1000, 1))`` with r fixed. On CPU, attention must use
    the math SDPA backend (no forward AD for the fused kernels); that is selected here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(x, tt):
        return model(x, tt, r, cond)

    ctx = sdpa_kernel(SDPBackend.MATH) if x_t.device.type == "cpu" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        _, dudt = torch.func.jvp(f, (x_t, t), (v / T_MAX, torch.ones_like(t)))
    return dudt


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------
class Stage1Objective:
    """The Stage-1 flow-map loss on a batch of real data. Holds one piece of state: a running mean of the
    diffusion-bucket loss, the fallback for rebalancing a batch that has no diffusion sample (kept on the losses'
    device, so that updating it never waits for the device; on the host in the state dict).

    Its statistics are detached device tensors: the training loop fetches all of a step's at once."""

    def __init__(self, cfg: Stage1Config, null_cond: Any | None = None):
        self.cfg = cfg
        self.null_cond = null_cond
        self.diffusion_mean_ema = torch.tensor(float("nan"), dtype=torch.float64, device="cpu")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"diffusion_mean_ema": self.diffusion_mean_ema.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.diffusion_mean_ema = state["diffusion_mean_ema"].clone().double()

    def __call__(self, model: FlowMap, x0: torch.Tensor, cond: Any, generator: torch.Generator | None = None,
                 part: Part | None = None, null: Any | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Returns the scalar loss (the mean over ``x0``'s rows, a ``part`` of the global batch) and logged
        statistics. ``null``: the batch's null condition when it is not simply the null condition repeated (the
        causal student's carries the clips' context)."""
        cfg, b = self.cfg, x0.shape[0]
        w = cfg.fuse_guidance_scale
        if null is None and self.null_cond is not None:
            null = expand_cond(self.null_cond, b)
        fuse = w is not None and w != 1.0 and null is not None
        # 1. condition dropout, (t, r) with buckets, the noisy point on the straight path
        if null is not None and cfg.cond_dropout > 0:
            cond, _ = drop_condition(cond, null, cfg.cond_dropout, b, generator, part)
        pairs = sample_time_pairs(b, cfg.shift, cfg.diffusion_ratio, cfg.consistency_ratio,
                                  split=cfg.bucket_split, part=part, generator=generator,
                                  time_dtype=torch.bfloat16 if cfg.time_dtype == "bfloat16" else torch.float32)
        t, r = pairs.t.to(x0.device), pairs.r.to(x0.device)
        eps = rng.noise_like(x0, generator, part)
        v, x_t = eps - x0, noisy(x0, eps, t)
        # 2. the student with grad; the derivative and the null branch without
        u_cond = model(x_t, t, r, cond)
        dudt, u_null = self._derivative_and_null(model, x_t, v, t, r, cond, null if fuse else None,
                                                 need=pairs.t > pairs.r)
        # 3. fusion and the MeanFlow target
        pred = fuse_guidance(u_cond, u_null, w) if fuse else u_cond
        target = meanflow_target(v.float(), t, r, (dudt / w if fuse else dudt).float()).detach()
        # 4. per-sample loss, beta08 weight, rebalance to the (global) diffusion mean
        losses = (pred.float() - target).pow(2).flatten(1).mean(1)
        loss = self._weighted(losses, t, pairs).mean()
        return loss, {"loss/stage1": loss.detach(), **_bucket_stats(losses.detach(), pairs)}

    def _derivative_and_null(self, model: FlowMap, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                             r: torch.Tensor, cond: Any, null: Any | None,
                             need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dF_c/dt (central difference of the samples with ``need``, t > r on the host, batched with the null
        branch in one no-grad call; or the exact JVP) and the null branch's output (None without fusion)."""
        cfg = self.cfg
        if cfg.derivative == "jvp":
            with torch.no_grad():
                u_null = None if null is None else model(x_t, t, r, null)
            return exact_derivative(model, x_t, v, t, r, cond), u_null
        return central_difference_and_null(model, x_t, v, t, r, cond, null, cfg.epsilon,
                                           cfg.fd_boundary == "one_sided", need)

    def _weighted(self, losses: torch.Tensor, t: torch.Tensor, pairs) -> torch.Tensor:
        """The per-sample losses with the loss weight w(t) (beta08, normal; none when uniform) and the adaptive
        rebalance (power > 0)."""
        cfg = self.cfg
        if cfg.weight_type != "uniform":
            losses = losses * loss_weight(t, cfg.weight_type, cfg.shift).to(losses)
        if cfg.rebalance_power > 0:
            losses = rebalance(losses, pairs.is_diffusion.to(losses.device),
                               self._diffusion_mean(losses.detach(), pairs.is_diffusion), cfg.rebalance_eps,
                               cfg.rebalance_power)
        return losses

    def _diffusion_mean(self, losses: torch.Tensor, is_diffusion: torch.Tensor) -> torch.Tensor:
        """Mean weighted loss of the diffusion bucket over all processes (the global batch; with gradient
        accumulation, the round of micro-batches computed together); the running mean when there is none; the
        losses themselves (scale 1) when none was ever seen. Chosen on the device (``torch.where``), and the rows
        picked by the host's ``is_diffusion``: no device sync."""
        rows = torch.nonzero(is_diffusion).flatten().to(losses.device)
        count = is_diffusion.sum().to(losses.device, losses.dtype)
        total = torch.stack([losses[rows].sum(), count]).double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        seen = total[1] > 0
        mean = total[0] / total[1]   # NaN when none; not chosen then
        ema = self.diffusion_mean_ema.to(total.device)
        updated = torch.where(torch.isnan(ema), mean, 0.9 * ema + 0.1 * mean)
        self.diffusion_mean_ema = torch.where(seen, updated, ema)
        fallback = torch.where(torch.isnan(ema), losses, ema.to(losses))
        return torch.where(seen, mean.to(losses), fallback)


def _bucket_stats(raw: torch.Tensor, pairs) -> dict[str, torch.Tensor]:
    """The unweighted mean squared error of each bucket present in the batch (device tensors; the buckets are
    the host's, so choosing the rows does not wait for the device)."""
    stats = {}
    for name, k in (("diffusion", 0), ("consistency", 1), ("free", 2)):
        sel = pairs.bucket == k
        if sel.any():
            stats[f"loss/{name}_mse"] = raw[torch.nonzero(sel).flatten().to(raw.device)].mean()
    return stats
