"""Stage 2: on-policy flow-map distillation (official ``Wan_AnyFlow_OnPolicy_Trainer``; for a causal student
``FAR_Wan_AnyFlow_OnPolicy_Trainer``).

Every ``critic_ratio`` iterations a generator step: DMD on the student's flow-map backward simulation from fresh
noise (the whole chunk-by-chunk rollout for a causal student) plus the co-trained Stage-1 loss on a data batch;
every iteration a critic step: flow matching on a stop-grad rollout of a fresh batch's prompts. The teacher is
frozen. :class:`DistributionMatching` is shared with the consistency baseline (:mod:`anystep.kinds.cbs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import rng
from ..backward_simulation import RolloutPlan, draw_plan, flowmap_backward_simulation
from ..causal import causal_backward_simulation, is_causal
from ..flowmap import FlowMap, expand_cond
from ..global_batch import Part
from ..objectives.conditioning import drop_condition
from ..objectives.dmd import dmd_loss
from ..objectives.flow_matching import flow_matching_loss
from ..objectives.flowmap import Stage1Config
from ..train.loop import STAGE2_EMA, STAGE2_OPTIM
from ..train.method import Method, Phase
from . import INIT_STUDENT, TEACHER, Kind, Parts, RoleSpec
from .stage1 import fused_guidance, stage1_objective

Rollout = Callable[[torch.Tensor, Any, RolloutPlan, torch.Generator, Part], torch.Tensor]


@dataclass
class DMDConfig:
    """The distribution-matching half of Stage 2 (official values), shared with the CBS+DMD baseline."""

    rollout_steps: tuple[int, ...] = (2, 4, 8, 16, 50)   # N drawn uniformly; k uniform in [0, N)
    dmd_batch_size: int = 2                    # rollouts per generator step over all processes, the first prompts
                                               # of the data batch (official: 2 / 1 per GPU, the whole batch)
    real_guidance: float = 3.0                 # teacher x0: c + s (c - u), s = 3 ("CFG 4")
    dmd_shift: float = 5.0                     # shift of the DMD re-noising times
    rollout_shift: float | None = None         # shift of the rollout's N-step grid; None: dmd_shift (official: one
                                               # scheduler, shift 5, for both)
    dmd_time_range: tuple[float, float] = (0.0, 1000.0)   # clamp of the DMD times (official: none, 0..1000)
    dmd_weight: float = 1.0
    critic_ratio: int = 1                      # generator steps every `critic_ratio` iterations; critic every one
    critic_shift: float = 5.0                  # critic flow matching: logit-normal t, shift
    cond_dropout: float = 0.0                  # prompts of the rollout and critic batches dropped to the null one;
                                               # official 0 (its 10% dropout is the co-trained loss's)
    teacher: str | None = None                 # teacher run; None: the nearest teacher run of the model.init chain
                                               # (wan world: the raw model when there is none); 'exact': the
                                               # world's analytic teacher (gmm)

    def __post_init__(self):
        if not self.rollout_steps or min(self.rollout_steps) < 1:
            raise ValueError(f"rollout_steps must be integers >= 1, got {list(self.rollout_steps)}")
        lo, hi = self.dmd_time_range
        if not 0.0 <= lo < hi <= 1000.0:
            raise ValueError(f"dmd_time_range must satisfy 0 <= min < max <= 1000, got {self.dmd_time_range}")
        if self.dmd_batch_size < 1 or self.critic_ratio < 1:
            raise ValueError("dmd_batch_size and critic_ratio must be >= 1")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must lie in [0, 1], got {self.cond_dropout}")
        for name in ("dmd_shift", "critic_shift", "rollout_shift"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def effective_rollout_shift(self) -> float:
        """The shift of the rollout's N-step grid."""
        return self.dmd_shift if self.rollout_shift is None else self.rollout_shift


@dataclass
class Stage2Config(DMDConfig):
    """Stage 2: the DMD half plus where the rollout's gradient flows and the co-trained Stage-1 loss."""

    rollout_grad: str = "all"                  # 'all' segments (official) or 'one' (FastVideo's port)
    cotrain_weight: float = 1.0                # the Stage-1 loss on a data batch, in the generator step

    def __post_init__(self):
        super().__post_init__()
        if self.rollout_grad not in ("all", "one"):
            raise ValueError(f"rollout_grad must be 'all' or 'one', got {self.rollout_grad!r}")
        if self.cotrain_weight < 0:
            raise ValueError(f"cotrain_weight must be >= 0, got {self.cotrain_weight}")


class DistributionMatching(Method):
    """DMD on the student's rollouts against a frozen teacher, with a critic (the "fake score") trained on the
    same rollouts, and an optional co-trained loss on data. ``rollout(noise, cond, plan, generator, part)`` makes
    the student's samples; the plan (N, k) comes from its own seeded stream, once per iteration. The rollout
    batch is the first ``dmd_batch_size`` prompts of the data batch (both global batches; a part computes its
    rows of each)."""

    def __init__(self, student: nn.Module, critic: nn.Module, teacher: FlowMap, world: Any, batch_size: int,
                 cfg: DMDConfig, rollout: Rollout, cotrain: Any | None = None, cotrain_weight: float = 0.0,
                 seed: int = 0):
        super().__init__(roles={"student": student, "critic": critic})
        self.teacher, self.world, self.batch_size, self.cfg = teacher, world, batch_size, cfg
        self.rollout, self.cotrain, self.cotrain_weight = rollout, cotrain, cotrain_weight
        self.plans = torch.Generator().manual_seed(seed + 1)

    def _rollout_inputs(self, generator: torch.Generator, part: Part, data: bool = False):
        """The part's rows of the rollout batch: the first ``dmd_batch_size`` prompts of a data batch (some
        dropped when asked) and fresh noise; with ``data``, also the part's rows of the data batch itself."""
        b, n = self.batch_size, min(self.cfg.dmd_batch_size, self.batch_size)
        batch = None
        if data:   # the prompts of rows of the data batch, then that batch itself
            with rng.replay(generator):
                rcond = self.world.conditions(b, generator, part.rows(n))
            batch = self.world.batch(b, generator, part.rows(b))
        else:
            rcond = self.world.conditions(b, generator, part.rows(n))
        rows = n // part.count
        if self.cfg.cond_dropout > 0:
            rcond, _ = drop_condition(rcond, expand_cond(self.world.null_cond, rows), self.cfg.cond_dropout, rows,
                                      generator, part)
        noise = rng.normal((rows, *self.world.shape), generator, part=part).to(self.world.device)
        return noise, rcond, batch

    def _generator_step(self, generator: torch.Generator, plan: RolloutPlan, part: Part):
        cfg = self.cfg
        noise, rcond, batch = self._rollout_inputs(generator, part, data=self.cotrain is not None)
        x_hat = self.rollout(noise, rcond, plan, generator, part)
        loss, stats = dmd_loss(x_hat, self.roles["critic"], self.teacher, rcond, self.world.null_cond,
                               guidance=cfg.real_guidance, shift=cfg.dmd_shift, time_range=cfg.dmd_time_range,
                               generator=generator, part=part)
        terms = {"loss/dmd": cfg.dmd_weight * loss}
        if self.cotrain is not None:
            x0, cond = batch
            s1, s1_stats = self.cotrain(self.roles["student"], x0, cond, generator, part)
            terms["loss/stage1"] = self.cotrain_weight * s1
            stats.update(s1_stats)
        return terms, stats

    def _critic_step(self, generator: torch.Generator, plan: RolloutPlan, part: Part):
        noise, rcond, _ = self._rollout_inputs(generator, part)
        with torch.no_grad():
            x_hat = self.rollout(noise, rcond, plan, generator, part)
        loss = flow_matching_loss(self.roles["critic"], x_hat, rcond, shift=self.cfg.critic_shift, cond_dropout=0.0,
                                  generator=generator, part=part)
        return {"loss/critic": loss}, {"loss/critic": loss.detach()}

    def phases(self, step: int, generator: torch.Generator) -> list[Phase]:
        phases = []
        if step % self.cfg.critic_ratio == 0:
            plan = draw_plan(self.cfg.rollout_steps, self.plans)
            phases.append(Phase("student", lambda part: self._generator_step(generator, plan, part)))
        critic_plan = draw_plan(self.cfg.rollout_steps, self.plans)
        return [*phases, Phase("critic", lambda part: self._critic_step(generator, critic_plan, part))]

    def state_dict(self):
        state = {"plans": self.plans.get_state()}
        if self.cotrain is not None:
            state["objective"] = self.cotrain.state_dict()
        return state

    def load_state_dict(self, state):
        self.plans.set_state(state["plans"])
        if self.cotrain is not None:
            self.cotrain.load_state_dict(state["objective"])


def flowmap_rollout(student: Any, cfg: Stage2Config) -> Rollout:
    """Flow-map backward simulation of the student (chunk by chunk against its own KV cache when causal)."""
    simulate = causal_backward_simulation if is_causal(student) else flowmap_backward_simulation
    return lambda noise, cond, plan, generator, part: simulate(student, noise, cond, plan,
                                                               shift=cfg.effective_rollout_shift, grad=cfg.rollout_grad)


def make_stage2(p: Parts) -> DistributionMatching:
    cfg, student = p.sections["stage2"], p.roles["student"].train()
    cotrain = stage1_objective(student, p.sections["stage1"], p.world.null_cond) if cfg.cotrain_weight > 0 else None
    return DistributionMatching(student, p.roles["critic"].train(), p.roles["teacher"], p.world, p.batch_size, cfg,
                                flowmap_rollout(student, cfg), cotrain, cfg.cotrain_weight, p.seed)


KIND = Kind(
    name="stage2", summary="Stage 2: on-policy flow-map distillation (flow-map backward simulation + DMD, "
                            "a critic, the co-trained Stage-1 loss)",
    preset="shapes_stage2", label="AnyFlow Stage 2", product="student", sampler="flowmap",
    sections={"stage1": lambda: Stage1Config(bidirectional_prob=0.0), "stage2": Stage2Config},
    roles=(RoleSpec("student", INIT_STUDENT, flowmap=True), RoleSpec("critic", TEACHER),
           RoleSpec("teacher", TEACHER, trained=False)),
    optim={"student": STAGE2_OPTIM, "critic": STAGE2_OPTIM}, ema=STAGE2_EMA,
    init=("stage1", "stage2"), init_required=True,
    make=make_stage2, guidance=fused_guidance, teacher_key="stage2.teacher", causal=True,
)
