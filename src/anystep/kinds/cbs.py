"""Baseline (b): consistency backward simulation + DMD (Self-Forcing / rCM style): an N-step
predict-x0-then-re-noise rollout of a consistency-distilled student, k steps without gradient and the x0 of step
k with gradient, scored by the same DMD and critic as AnyFlow's Stage 2 (:mod:`anystep.kinds.stage2`). No
co-trained loss (a consistency model has none)."""

from __future__ import annotations

from ..backward_simulation import consistency_backward_simulation
from ..train.loop import STAGE2_EMA, STAGE2_OPTIM
from . import INIT_STUDENT, TEACHER, Kind, Parts, RoleSpec
from .stage2 import DistributionMatching, DMDConfig


def make_cbs(p: Parts) -> DistributionMatching:
    cfg, student = p.sections["cbs"], p.roles["student"].train()

    def rollout(noise, cond, plan, generator, part):
        return consistency_backward_simulation(student, noise, cond, plan, shift=cfg.effective_rollout_shift,
                                               generator=generator, part=part)

    return DistributionMatching(student, p.roles["critic"].train(), p.roles["teacher"], p.world, p.batch_size, cfg,
                                rollout, seed=p.seed)


KIND = Kind(
    name="cbs", summary="baseline: consistency backward simulation + DMD, from a consistency-distilled "
                         "student",
    preset="shapes_cbs", label="consistency + DMD", product="student", sampler="consistency",
    sections={"cbs": DMDConfig},
    roles=(RoleSpec("student", INIT_STUDENT, flowmap=True), RoleSpec("critic", TEACHER),
           RoleSpec("teacher", TEACHER, trained=False)),
    optim={"student": STAGE2_OPTIM, "critic": STAGE2_OPTIM}, ema=STAGE2_EMA,
    init=("consistency", "cbs"), init_required=True,
    make=make_cbs, guidance=lambda cfg: 1.0 + cfg.cbs.real_guidance, teacher_key="cbs.teacher",
)
