"""Methods: an algorithm's losses, and which role's optimizer steps on each iteration.

A Method holds its trainable ``roles`` (name -> module) and returns, per iteration, a list of
:class:`Phase`: (role, a function returning that role's loss terms). The generic loop
(:mod:`anystep.train.loop`) does the rest. Data comes from a world: ``world.batch(n, generator)`` returns
``(x0 (B, F, C, H, W), cond)`` and ``world.null_cond`` is the dropped condition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..objectives.flow_matching import flow_matching_step
from ..objectives.flowmap import Stage1Config, Stage1Objective


@dataclass
class Phase:
    role: str
    run: Callable[[], tuple[dict[str, torch.Tensor], dict[str, float]]]


@dataclass
class Method:
    roles: dict[str, nn.Module]
    ema_roles: tuple[str, ...] = ("student",)
    optim_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def phases(self, step: int, generator: torch.Generator) -> list[Phase]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TeacherFineTune(Method):
    """Plain flow matching of a velocity model (the teacher; official ``WanTeacherTrainer``)."""

    def __init__(self, teacher: nn.Module, world: Any, batch_size: int, shift: float = 5.0,
                 cond_dropout: float = 0.1):
        super().__init__(roles={"teacher": teacher}, ema_roles=("teacher",))
        self.world, self.batch_size, self.shift, self.cond_dropout = world, batch_size, shift, cond_dropout

    def phases(self, step, generator):
        def run():
            x0, cond = self.world.batch(self.batch_size, generator)
            loss, stats = flow_matching_step(self.roles["teacher"], x0, cond, self.world.null_cond,
                                             shift=self.shift, cond_dropout=self.cond_dropout,
                                             generator=generator)
            return {"loss/flow_matching": loss}, stats
        return [Phase("teacher", run)]


class Stage1(Method):
    """Forward flow-map training on real data (official ``Wan_AnyFlow_Pretrain_Trainer``)."""

    def __init__(self, student: nn.Module, world: Any, batch_size: int, cfg: Stage1Config):
        super().__init__(roles={"student": student}, ema_roles=("student",))
        self.world, self.batch_size = world, batch_size
        self.objective = Stage1Objective(cfg, world.null_cond)

    def phases(self, step, generator):
        def run():
            x0, cond = self.world.batch(self.batch_size, generator)
            loss, stats = self.objective(self.roles["student"], x0, cond, generator)
            return {"loss/stage1": loss}, stats
        return [Phase("student", run)]

    def state_dict(self):
        return {"objective": self.objective.state_dict()}

    def load_state_dict(self, state):
        self.objective.load_state_dict(state["objective"])
