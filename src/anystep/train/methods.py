"""Methods: an algorithm's losses, and which role's optimizer steps on each iteration.

A Method holds its trainable ``roles`` (name -> module) and returns, per iteration, a list of
:class:`Phase`: (role, a function returning that role's loss terms). The generic loop
(:mod:`anystep.train.loop`) does the rest. Data comes from a world: ``world.batch(n, generator)`` returns
``(x0 (B, F, C, H, W), cond)`` and ``world.null_cond`` is the dropped condition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .. import rng
from ..backward_simulation import consistency_backward_simulation, draw_plan, flowmap_backward_simulation
from ..causal import causal_backward_simulation
from ..config import CausalConfig, ConsistencyConfig, Stage2Config
from ..flowmap import FlowMap, expand_cond, guided, take_rows
from ..objectives.conditioning import drop_condition
from ..objectives.causal_flowmap import CausalStage1Objective
from ..objectives.consistency import consistency_distillation_loss
from ..objectives.dmd import dmd_loss
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


class Stage2(Method):
    """On-policy flow-map distillation (official ``Wan_AnyFlow_OnPolicy_Trainer``).

    Generator step (every ``critic_ratio`` iterations): DMD on a backward-simulated rollout from fresh noise
    plus the co-trained Stage-1 loss on a real batch. Critic step (every iteration): flow matching on a
    stop-grad rollout. The teacher is frozen. With ``cfg.rollout="consistency"`` the rollout is the
    consistency backward simulation and there is no co-trained loss (the baseline).
    """

    def __init__(self, student: nn.Module, critic: nn.Module, teacher: FlowMap, world: Any, batch_size: int,
                 cfg: Stage2Config, stage1: Stage1Config, seed: int = 0):
        super().__init__(roles={"student": student, "critic": critic}, ema_roles=("student",),
                         optim_overrides={"critic": {"lr": cfg.critic_lr or cfg.optim.lr}})
        self.teacher, self.world, self.batch_size, self.cfg = teacher, world, batch_size, cfg
        self.stage1 = Stage1Objective(stage1, world.null_cond) if cfg.cotrain_weight > 0 else None
        self.plans = torch.Generator().manual_seed(seed + 1)   # (N, k) draws: their own reproducible stream

    def rollout(self, noise: torch.Tensor, cond: Any, generator: torch.Generator) -> torch.Tensor:
        plan = draw_plan(self.cfg.rollout_steps, self.plans)
        student = self.roles["student"]
        if self.cfg.rollout == "consistency":
            return consistency_backward_simulation(student, noise, cond, plan, shift=self.cfg.grid_shift,
                                                   generator=generator)
        return flowmap_backward_simulation(student, noise, cond, plan, shift=self.cfg.grid_shift,
                                           grad=self.cfg.rollout_grad)

    def _rollout_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, Any, torch.Tensor, Any]:
        """A data batch (for the co-trained loss), and the rollout's prompts (dropped) and noise."""
        x0, cond = self.world.batch(self.batch_size, generator)
        n = min(self.cfg.dmd_batch_size, self.batch_size)
        rollout_cond = take_rows(cond, slice(n))
        if self.cfg.cond_dropout > 0:
            rollout_cond, _ = drop_condition(rollout_cond, expand_cond(self.world.null_cond, n),
                                             self.cfg.cond_dropout, n, generator)
        noise = rng.normal((n, *x0.shape[1:]), generator).to(x0)
        return x0, cond, noise, rollout_cond

    def phases(self, step, generator):
        cfg = self.cfg

        def generator_step():
            x0, cond, noise, rcond = self._rollout_batch(generator)
            x_hat = self.rollout(noise, rcond, generator)
            loss, stats = dmd_loss(x_hat, self.roles["critic"], self.teacher, rcond, self.world.null_cond,
                                   guidance=cfg.real_guidance, shift_k=cfg.dmd_shift,
                                   time_range=cfg.dmd_time_range, generator=generator)
            terms = {"loss/dmd": cfg.dmd_weight * loss}
            if self.stage1 is not None:
                s1, s1_stats = self.stage1(self.roles["student"], x0, cond, generator)
                terms["loss/stage1"] = cfg.cotrain_weight * s1
                stats.update(s1_stats)
            return terms, stats

        def critic_step():
            _, _, noise, rcond = self._rollout_batch(generator)
            with torch.no_grad():
                x_hat = self.rollout(noise, rcond, generator)
            loss, _ = flow_matching_step(self.roles["critic"], x_hat, rcond, shift=cfg.critic_shift,
                                         cond_dropout=0.0, generator=generator)
            return {"loss/critic": loss}, {"loss/critic": loss.item()}

        phases = [Phase("student", generator_step)] if step % cfg.critic_ratio == 0 else []
        return phases + [Phase("critic", critic_step)]

    def state_dict(self):
        state = {"plans": self.plans.get_state()}
        if self.stage1 is not None:
            state["objective"] = self.stage1.state_dict()
        return state

    def load_state_dict(self, state):
        self.plans.set_state(state["plans"])
        if self.stage1 is not None:
            self.stage1.load_state_dict(state["objective"])


class CausalStage1(Stage1):
    """Causal Stage 1: the Stage-1 loss under teacher forcing (official ``FAR_Wan_AnyFlow_Pretrain_Trainer``)."""

    def __init__(self, student: nn.Module, world: Any, batch_size: int, cfg: Stage1Config, causal: CausalConfig):
        super().__init__(student, world, batch_size, cfg)
        self.objective = CausalStage1Objective(cfg, causal, world.null_cond)


class CausalStage2(Stage2):
    """Causal Stage 2 (official ``FAR_Wan_AnyFlow_OnPolicy_Trainer``): the rollout is chunk by chunk with a KV
    cache of the student's own output, each chunk by flow-map backward simulation; DMD scores the whole rollout
    with the bidirectional teacher and critic; the co-trained loss is causal Stage 1 (no bidirectional term)."""

    def __init__(self, student: nn.Module, critic: nn.Module, teacher: FlowMap, world: Any, batch_size: int,
                 cfg: Stage2Config, stage1: Stage1Config, causal: CausalConfig, seed: int = 0):
        if cfg.rollout != "flowmap":
            raise ValueError("the causal Stage 2 rolls out with flow-map backward simulation (stage2.rollout=flowmap)")
        super().__init__(student, critic, teacher, world, batch_size, cfg, stage1, seed=seed)
        if self.stage1 is not None:
            self.stage1 = CausalStage1Objective(stage1, replace(causal, bidirectional_prob=0.0), world.null_cond)

    def rollout(self, noise: torch.Tensor, cond: Any, generator: torch.Generator) -> torch.Tensor:
        plan = draw_plan(self.cfg.rollout_steps, self.plans)
        return causal_backward_simulation(self.roles["student"], noise, cond, plan, shift=self.cfg.grid_shift,
                                          grad=self.cfg.rollout_grad)


class ConsistencyDistillation(Method):
    """The consistency-distillation baseline: an endpoint map (the student at r = 0) distilled from the
    guided teacher's ODE."""

    def __init__(self, student: nn.Module, teacher: FlowMap, world: Any, batch_size: int,
                 cfg: ConsistencyConfig):
        super().__init__(roles={"student": student}, ema_roles=("student",))
        self.teacher = guided(teacher, cfg.teacher_guidance, world.null_cond)
        self.world, self.batch_size, self.cfg = world, batch_size, cfg

    def phases(self, step, generator):
        def run():
            x0, cond = self.world.batch(self.batch_size, generator)
            if self.cfg.cond_dropout > 0:
                cond, _ = drop_condition(cond, expand_cond(self.world.null_cond, x0.shape[0]),
                                         self.cfg.cond_dropout, x0.shape[0], generator)
            loss, stats = consistency_distillation_loss(self.roles["student"], self.teacher, x0, cond,
                                                        intervals=self.cfg.intervals, shift=self.cfg.shift,
                                                        generator=generator)
            return {"loss/consistency": loss}, stats
        return [Phase("student", run)]

