"""The teacher fine-tune: plain flow matching of a velocity model (official ``WanTeacherTrainer``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..objectives.flow_matching import flow_matching_loss
from ..train.loop import EMAConfig, OptimConfig
from ..train.method import Method, Phase
from . import FRESH_OR_INIT, Kind, RoleSpec


@dataclass
class TeacherConfig:
    """Flow matching with logit-normal times (official: shift 5, 10% of prompts dropped to the null one)."""

    shift: float = 5.0
    cond_dropout: float = 0.1

    def __post_init__(self):
        if not self.shift > 0 or not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"teacher.shift must be > 0 and teacher.cond_dropout in [0, 1], got {self}")


class TeacherFineTune(Method):
    """Flow matching of the ``teacher`` role on the world's batches."""

    def __init__(self, teacher: nn.Module, world: Any, batch_size: int, cfg: TeacherConfig):
        super().__init__(roles={"teacher": teacher})
        self.world, self.batch_size, self.cfg = world, batch_size, cfg

    def phases(self, step: int, generator: torch.Generator) -> list[Phase]:
        def run(part):
            x0, cond = self.world.batch(self.batch_size, generator, part.rows(self.batch_size))
            loss = flow_matching_loss(self.roles["teacher"], x0, cond, self.world.null_cond, shift=self.cfg.shift,
                                      cond_dropout=self.cfg.cond_dropout, generator=generator, part=part)
            return {"loss/flow_matching": loss}, {"loss/flow_matching": loss.detach()}
        return [Phase("teacher", run)]


KIND = Kind(
    name="teacher", summary="train a velocity teacher by flow matching (the teacher fine-tune)",
    preset="shapes_teacher", label="teacher", product="teacher", sampler="euler",
    sections={"teacher": TeacherConfig},
    roles=(RoleSpec("teacher", FRESH_OR_INIT),),
    optim={"teacher": OptimConfig()}, ema=EMAConfig(),
    init=("teacher",), init_required=False,
    make=lambda p: TeacherFineTune(p.roles["teacher"].train(), p.world, p.batch_size, p.sections["teacher"]),
    guidance=lambda cfg: cfg.sweep.teacher_guidance,
)
