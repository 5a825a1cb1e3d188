"""Stage 1: forward flow-map training on real data (official ``Wan_AnyFlow_Pretrain_Trainer``; for a causal
student ``FAR_Wan_AnyFlow_Pretrain_Trainer``: the same loss under teacher forcing)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..causal import is_causal
from ..objectives.causal_flowmap import CausalStage1Objective
from ..objectives.flowmap import Stage1Config, Stage1Objective
from ..train.loop import EMAConfig, OptimConfig
from ..train.method import Method, Phase
from . import STUDENT_OF_TEACHER, Kind, RoleSpec


def stage1_objective(student: Any, cfg: Stage1Config, null_cond: Any) -> Stage1Objective | CausalStage1Objective:
    """The Stage-1 loss of ``student``: teacher-forced when it is a causal flow map."""
    return CausalStage1Objective(cfg, null_cond) if is_causal(student) else Stage1Objective(cfg, null_cond)


class Stage1(Method):
    """The Stage-1 loss on a data batch every iteration; the student's optimizer steps."""

    def __init__(self, student: nn.Module, world: Any, batch_size: int, cfg: Stage1Config):
        super().__init__(roles={"student": student})
        self.world, self.batch_size = world, batch_size
        self.objective = stage1_objective(student, cfg, world.null_cond)

    def phases(self, step: int, generator: torch.Generator) -> list[Phase]:
        def run(part):
            x0, cond = self.world.batch(self.batch_size, generator, part.rows(self.batch_size))
            loss, stats = self.objective(self.roles["student"], x0, cond, generator, part)
            return {"loss/stage1": loss}, stats
        return [Phase("student", run)]

    def state_dict(self):
        return {"objective": self.objective.state_dict()}

    def load_state_dict(self, state):
        self.objective.load_state_dict(state["objective"])


def fused_guidance(cfg: Any) -> float:
    """The CFG scale a Stage-1 student's samples follow: its fusion scale (1 when fusion is off)."""
    return cfg.stage1.fuse_guidance_scale or 1.0


KIND = Kind(
    name="stage1", summary="Stage 1: forward flow-map training of the student (a causal one with model.causal)",
    preset="shapes_stage1", label="AnyFlow Stage 1", product="student", sampler="flowmap",
    sections={"stage1": Stage1Config},
    roles=(RoleSpec("student", STUDENT_OF_TEACHER, flowmap=True),),
    optim={"student": OptimConfig()}, ema=EMAConfig(),
    init=("teacher", "stage1", "stage2"), init_required=False,   # none: a fresh network (or the folder's model)
    make=lambda p: Stage1(p.roles["student"].train(), p.world, p.batch_size, p.sections["stage1"]),
    guidance=fused_guidance, causal=True,
)
