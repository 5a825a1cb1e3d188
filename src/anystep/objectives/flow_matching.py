"""Plain flow matching: the teacher fine-tune and the Stage-2 critic.

``x_t = (1 - s) x0 + s eps``, target ``v = eps - x0``, model queried with r = t (it is a velocity model),
t logit-normal and shifted: ``t = 1000 time_shift(sigmoid(N(0, 1)))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import rng
from ..flowmap import FlowMap, noisy
from ..time import logit_normal
from .conditioning import drop_condition

if TYPE_CHECKING:
    from ..global_batch import Part


def flow_matching_error(model: FlowMap, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                        cond: Any) -> torch.Tensor:
    """Per-sample ``mean((u(x_t, t, t) - (eps - x0))^2)``, shape (B,)."""
    u = model(noisy(x0, eps, t), t, t, cond)
    return (u.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)


def flow_matching_loss(model: FlowMap, x0: torch.Tensor, cond: Any, null_cond: Any | None = None, *,
                       shift: float = 5.0, cond_dropout: float = 0.1,
                       generator: torch.Generator | None = None, part: Part | None = None) -> torch.Tensor:
    """The flow-matching loss of a batch (``x0``: a ``part``'s rows): logit-normal shifted t, fresh noise, each
    prompt dropped to the null condition with probability ``cond_dropout``."""
    b = x0.shape[0]
    if null_cond is not None and cond_dropout > 0:
        cond, _ = drop_condition(cond, null_cond, cond_dropout, b, generator, part)
    t = logit_normal(b, shift, generator=generator, part=part).to(x0.device)
    eps = rng.noise_like(x0, generator, part)
    return flow_matching_error(model, x0, eps, t, cond).mean()
