"""Run kinds: one table, read by training, loading, sampling, the sweep and the demo.

A :class:`Kind` says everything that differs between the kinds of run: its config sections (beside the common
``world``, ``model``, ``train``, ``optim``, ``ema``, ``sweep``), the roles it trains or holds frozen and where
each one's weights start, the optimizer defaults of its trained roles, what ``model.init`` may name, how its
:class:`~anystep.train.method.Method` is made from built roles, how its product samples, and what its sweep rows
are called. Adding a kind is one module of this package and its import in :func:`_registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UsageError
from ..flowmap import FlowMap
from ..train.loop import EMAConfig, OptimConfig
from ..train.method import Method

# Where a role's weights start (the assembly, anystep.build, knows how for full copies and LoRA adapters):
FRESH_OR_INIT = "fresh_or_init"            # a new velocity network, or model.init's (a teacher run to continue)
STUDENT_OF_TEACHER = "student_of_teacher"  # the flow-map student made from the teacher's velocity network
INIT_STUDENT = "init_student"              # model.init's student
TEACHER = "teacher"                        # the teacher's velocity network (the critic's start; the frozen teacher)


@dataclass(frozen=True)
class RoleSpec:
    name: str                  # 'teacher', 'student' or 'critic'
    start: str                 # one of the starts above
    trained: bool = True       # False: frozen (the DMD teacher, the consistency teacher)
    flowmap: bool = False      # True: a flow-map role (uses r); else a velocity role (r := t)


@dataclass
class Parts:
    """What a kind's method is made from: built roles (trained and frozen; a frozen ``teacher`` may be the
    world's exact velocity), the world (on the training device), the batch size, the seed and the kind's own
    config sections."""

    roles: dict[str, nn.Module | FlowMap]
    world: Any
    batch_size: int
    seed: int
    sections: dict[str, Any] = field(default_factory=dict)

    def trained(self, *names: str) -> dict[str, nn.Module]:
        return {n: self.roles[n].train() for n in names}


@dataclass(frozen=True)
class Kind:
    name: str
    summary: str                                 # one line for ``anystep --help``
    preset: str | None                           # the command's default preset (None: the config defaults)
    label: str                                   # a sweep row's name
    product: str                                 # the role a run of this kind makes (its EMA is kept)
    sampler: str                                 # how the product samples: 'euler', 'flowmap', 'consistency'
    sections: dict[str, Callable[[], Any]]       # its config sections and their defaults
    roles: tuple[RoleSpec, ...]
    optim: dict[str, OptimConfig]                # default optimizer of every trained role
    ema: EMAConfig
    init: tuple[str, ...]                        # the kinds model.init may name
    init_required: bool                          # (the wan world may start from the model folder instead)
    make: Callable[[Parts], Method]
    guidance: Callable[[Any], float]             # the CFG scale its samples follow (the config -> float)
    teacher_key: str | None = None               # the section field naming its teacher ('stage2.teacher', ...)
    causal: bool = False                         # may train a causal (FAR) student

    @property
    def trained_roles(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles if r.trained)

    def role(self, name: str) -> RoleSpec:
        return next(r for r in self.roles if r.name == name)


def _registry() -> dict[str, Kind]:
    from . import cbs, consistency, stage1, stage2, teacher
    return {k.KIND.name: k.KIND for k in (teacher, stage1, stage2, consistency, cbs)}


KINDS: dict[str, Kind] = {}


def kind(name: str) -> Kind:
    """The kind named ``name``, or a UsageError listing the kinds."""
    if not KINDS:
        KINDS.update(_registry())
    if name not in KINDS:
        raise UsageError(f"kind must be one of {list(KINDS)}, got {name!r}")
    return KINDS[name]


def all_kinds() -> dict[str, Kind]:
    kind("teacher")
    return dict(KINDS)


def no_grad_frozen(module: Any) -> Any:
    """A frozen role: no parameter requires a gradient (a plain function, such as an exact teacher, as it is)."""
    if isinstance(module, nn.Module):
        module.requires_grad_(False)
    return module


__all__ = [
    "FRESH_OR_INIT",
    "INIT_STUDENT",
    "KINDS",
    "STUDENT_OF_TEACHER",
    "TEACHER",
    "Kind",
    "Parts",
    "RoleSpec",
    "all_kinds",
    "kind",
    "no_grad_frozen",
]
