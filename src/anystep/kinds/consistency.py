"""Baseline (a): consistency distillation. The student (the same flow-map network queried at r = 0: an endpoint
map) learns the guided teacher's ODE and samples by predict-x0-then-re-noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..flowmap import FlowMap, expand_cond, guided
from ..objectives.conditioning import drop_condition
from ..objectives.consistency import consistency_distillation_loss
from ..train.loop import EMAConfig, OptimConfig
from ..train.method import Method, Phase
from . import STUDENT_OF_TEACHER, TEACHER, Kind, RoleSpec


@dataclass
class ConsistencyConfig:
    """Consistency distillation along the guided teacher's ODE."""

    intervals: int = 32                        # discretisation of [0, 1000] (shifted grid)
    teacher_guidance: float = 3.0              # CFG of the teacher's ODE step (the student is fused)
    teacher: str | None = None                 # None: model.init (a teacher run); 'exact': the analytic (gmm)
    cond_dropout: float = 0.1
    shift: float = 5.0

    def __post_init__(self):
        if self.intervals < 1 or not self.shift > 0 or not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"consistency needs intervals >= 1, shift > 0 and cond_dropout in [0, 1], got {self}")


class ConsistencyDistillation(Method):
    """The consistency loss on a data batch every iteration (:mod:`anystep.objectives.consistency`)."""

    def __init__(self, student: nn.Module, teacher: FlowMap, world: Any, batch_size: int, cfg: ConsistencyConfig):
        super().__init__(roles={"student": student})
        self.teacher = guided(teacher, cfg.teacher_guidance, world.null_cond)
        self.world, self.batch_size, self.cfg = world, batch_size, cfg

    def phases(self, step: int, generator: torch.Generator) -> list[Phase]:
        def run(part):
            x0, cond = self.world.batch(self.batch_size, generator, part.rows(self.batch_size))
            if self.cfg.cond_dropout > 0:
                cond, _ = drop_condition(cond, expand_cond(self.world.null_cond, x0.shape[0]),
                                         self.cfg.cond_dropout, x0.shape[0], generator, part)
            loss, stats = consistency_distillation_loss(self.roles["student"], self.teacher, x0, cond,
                                                        intervals=self.cfg.intervals, shift=self.cfg.shift,
                                                        generator=generator, part=part)
            return {"loss/consistency": loss}, stats
        return [Phase("student", run)]


KIND = Kind(
    name="consistency", summary="baseline: consistency distillation (an endpoint map from the teacher's "
                                 "ODE, sampled by predict-x0-then-re-noise)",
    preset="shapes_consistency", label="consistency distillation", product="student", sampler="consistency",
    sections={"consistency": ConsistencyConfig},
    roles=(RoleSpec("student", STUDENT_OF_TEACHER, flowmap=True), RoleSpec("teacher", TEACHER, trained=False)),
    optim={"student": OptimConfig()}, ema=EMAConfig(),
    init=("teacher",), init_required=True,
    make=lambda p: ConsistencyDistillation(p.roles["student"].train(), p.roles["teacher"], p.world, p.batch_size,
                                           p.sections["consistency"]),
    guidance=lambda cfg: cfg.consistency.teacher_guidance, teacher_key="consistency.teacher",
)
