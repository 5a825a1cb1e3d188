"""Causal Stage 1 (official ``FAR_Wan_AnyFlow_Pretrain_Trainer``): the Stage-1 flow-map loss under teacher forcing.

Per step: K chunks of the clip (``draw_num_chunks``: long context with probability 0.5), the newest
``full_chunk_limit`` of them noisy at one (t, r) per sample, older ones compressed clean context, and clean
copies of the noisy chunks at t = r = 0 (:func:`~anystep.causal.teacher_forcing_split`). The loss is the
bidirectional Stage-1 objective (:class:`~anystep.objectives.flowmap.Stage1Objective`: buckets, central
difference, fused guidance, beta08, rebalance) on the noisy frames only; its null branch and its
difference points see the same context and copies. With probability ``bidirectional_prob`` a plain flow-matching
loss with fused guidance (r = t, logit-normal t) on all frames in bidirectional mode is added, which keeps the
weights usable as a bidirectional model (official Stage 1: 0.1; Stage 2's co-trained loss: 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import rng
from ..causal import CausalFlowMap, TeacherForcing, draw_num_chunks, teacher_forcing_split
from ..flowmap import expand_cond, noisy
from ..time import logit_normal
from .conditioning import drop_condition
from .flowmap import Stage1Config, Stage1Objective, fuse_guidance

if TYPE_CHECKING:
    from ..global_batch import Part


class CausalStage1Objective:
    """Called like :class:`Stage1Objective`, on a :class:`~anystep.causal.CausalFlowMap` student; its
    ``long_context_ratio`` and ``bidirectional_prob`` come from the Stage-1 config."""

    def __init__(self, stage1: Stage1Config, null_cond: Any):
        self.stage1, self.null_cond = stage1, null_cond
        self.flowmap = Stage1Objective(stage1, null_cond)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.flowmap.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.flowmap.load_state_dict(state)

    def __call__(self, student: CausalFlowMap, x0: torch.Tensor, text: torch.Tensor,
                 generator: torch.Generator | None = None, part: Part | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, b = self.stage1, x0.shape[0]
        partition = student.chunk_partition
        k = draw_num_chunks(len(partition), student.full_chunk_limit, cfg.long_context_ratio, generator)
        context, targets = teacher_forcing_split(x0, partition, k, student.full_chunk_limit)
        cond = TeacherForcing(text, targets, context)
        null = TeacherForcing(expand_cond(self.null_cond, b), targets, context)
        loss, stats = self.flowmap(student, targets, cond, generator, part, null=null)
        stats["causal/chunks"] = float(k)
        if cfg.bidirectional_prob > 0 and float(rng.uniform((), generator)) < cfg.bidirectional_prob:
            extra = bidirectional_flow_matching(student, x0, text, self.null_cond, cfg, generator, part)
            loss = loss + extra
            stats["loss/bidirectional"] = extra.detach()
        return loss, stats


def bidirectional_flow_matching(student, x0: torch.Tensor, text: torch.Tensor, null_cond: Any,
                                stage1: Stage1Config, generator: torch.Generator | None = None,
                                part: Part | None = None) -> torch.Tensor:
    """Plain flow matching (r = t, logit-normal t with the Stage-1 shift, no weighting) of the student in
    bidirectional mode on all frames, with fused guidance ``w`` and a stop-grad null branch."""
    b = x0.shape[0]
    null = expand_cond(null_cond, b)
    if stage1.cond_dropout > 0:
        text, _ = drop_condition(text, null, stage1.cond_dropout, b, generator, part)
    t = logit_normal(b, stage1.shift, generator=generator, part=part).to(x0.device)
    eps = rng.noise_like(x0, generator, part)
    x_t = noisy(x0, eps, t)
    pred = student.bidirectional(x_t, t, t, text)
    w = stage1.fuse_guidance_scale
    if w is not None and w != 1.0:
        with torch.no_grad():
            u_null = student.bidirectional(x_t, t, t, null)
        pred = fuse_guidance(pred, u_null, w)
    return (pred.float() - (eps - x0).float()).pow(2).mean()
