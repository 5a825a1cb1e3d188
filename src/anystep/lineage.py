"""Where a run's weights come from, resolved once.

A run on disk (:class:`Run`) is a checkpoint folder with its ``config.yaml`` and ``architecture.json`` (the
description of every saved network, :mod:`anystep.models.zoo`). A new run's :class:`Lineage` names the runs its
roles start from: ``model.init``; the teacher (named in the kind's section, else the nearest teacher run along
the ``model.init`` chain, or the world's exact teacher); and, for LoRA roles, the frozen base (the wan world's
model folder, or the toy worlds' teacher run). Every check that a lineage fits the run (same world, kinds that
may start one another, one base for all adapters) is made here, before anything is built or written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, parse_run
from .errors import UsageError
from .train.checkpoint import CheckpointError, find_checkpoint
from .worlds import WORLDS

SHIPPED_PREFIX = "shipped:"
ARCHITECTURE = "architecture.json"


@dataclass(frozen=True)
class Run:
    """A trained run's checkpoint folder, as named by the user (``spec``)."""

    spec: str
    path: Path
    config: RunConfig

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def world(self) -> str:
        return self.config.world.name

    @property
    def lora(self) -> bool:
        return self.config.model.lora_rank > 0

    def architecture(self, role: str) -> dict[str, Any]:
        """The saved description of ``role``'s network."""
        path = self.path / ARCHITECTURE
        try:
            described = json.loads(path.read_text())[role]
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file missing: {path}") from None
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{path} does not describe a {role!r} network: {err}") from err
        return described

    def weights(self, role: str, ema: bool = True) -> Path:
        """``role``'s weights: its EMA when asked for and saved."""
        path = self.path / f"{role}_ema.safetensors"
        return path if ema and path.is_file() else self.path / f"{role}.safetensors"

    def has(self, role: str) -> bool:
        return any((self.path / f"{role}{sfx}.safetensors").is_file() for sfx in ("", "_ema"))


def checkpoint_path(spec: str) -> Path:
    """A checkpoint folder from a run folder, a checkpoint folder, or ``shipped:<name>`` (one in the package)."""
    if spec.startswith(SHIPPED_PREFIX):
        name = spec[len(SHIPPED_PREFIX):]
        res = resources.files("anystep") / "assets" / name
        if not res.is_dir():
            raise CheckpointError(f"no shipped checkpoint named {name!r}")
        return Path(str(res))
    return find_checkpoint(spec)


def open_run(spec: str | Path) -> Run:
    """The run ``spec`` names (a CheckpointError when there is none, or its config is corrupt)."""
    path = checkpoint_path(str(spec))
    return Run(str(spec), path, read_config(path / "config.yaml"))


def read_config(path: Path) -> RunConfig:
    """A run's ``config.yaml`` (a CheckpointError when it is missing or corrupt), cached while the file is
    unchanged."""
    return _read_config(path, path.stat().st_mtime_ns if path.is_file() else -1)


@lru_cache(maxsize=64)
def _read_config(path: Path, mtime: int) -> RunConfig:
    if not path.is_file():
        raise CheckpointError(f"config missing: {path}")
    try:
        return parse_run(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError) as err:
        raise CheckpointError(f"corrupt config in {path}: {err}") from err


def chain(run: Run | None):
    """``run`` and the runs of its ``model.init`` chain, newest first."""
    while run is not None:
        yield run
        run = open_run(run.config.model.init) if run.config.model.init else None


def nearest_teacher(run: Run | None) -> Run | None:
    """The first teacher run along ``run``'s chain (a Stage-2 run's init is a Stage-1 run, whose init is the
    teacher), or None."""
    return next((r for r in chain(run) if r.kind == "teacher"), None)


# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lineage:
    """The runs a new run's roles start from.

    ``init``: ``model.init``. ``teacher``: the teacher run (the critic's start and, unless ``exact``, the frozen
    teacher); None in the wan world when the raw model is the teacher. ``exact``: the frozen teacher is the
    world's analytic one. ``base``: LoRA runs' frozen base, the wan world's model folder (a str) or a toy teacher
    run."""

    init: Run | None
    teacher: Run | None
    exact: bool = False
    base: Run | str | None = None


def resolve_lineage(cfg: RunConfig) -> Lineage:
    """The lineage of a run to be trained, checked (a UsageError naming what does not fit)."""
    spec = cfg.spec
    init = open_run(cfg.model.init) if cfg.model.init else None
    _check_init(cfg, init)
    named = _named_teacher(cfg)
    exact = named == "exact"
    if exact and not WORLDS[cfg.world.name].exact_teacher:
        exact_worlds = [name for name, entry in WORLDS.items() if entry.exact_teacher]
        raise UsageError(f"{spec.teacher_key}=exact needs a world with an analytic teacher ({', '.join(exact_worlds)}), "
                         f"not {cfg.world.name!r}")
    if named and not exact:
        teacher = open_run(named)
        _check_world(cfg, teacher, spec.teacher_key)
        if teacher.kind != "teacher":
            raise UsageError(f"{spec.teacher_key}={teacher.spec} is a {teacher.kind!r} run, not a teacher run")
    else:
        teacher = nearest_teacher(init)
    base = _lora_base(cfg, init, teacher) if cfg.model.lora_rank > 0 else None
    return Lineage(init, teacher, exact, base)


def _check_init(cfg: RunConfig, init: Run | None) -> None:
    spec = cfg.spec
    if init is None:
        if spec.init_required and not _imports_a_student(cfg):
            raise UsageError(f"a {spec.name} run starts from a trained model: set model.init to a "
                             f"{' or '.join(spec.init)} run")
        return
    _check_world(cfg, init, "model.init")
    if cfg.model.network is not None or (cfg.model.causal is not None and init.kind != "teacher"):
        key = "model.network" if cfg.model.network is not None else "model.causal"
        raise UsageError(f"{key} is given, but a run from model.init={init.spec} keeps that run's network: drop {key}")
    if init.kind not in spec.init:
        raise UsageError(f"model.init={init.spec} is a {init.kind!r} run; a {spec.name} run starts from a "
                         f"{' or '.join(spec.init)} run")
    if cfg.model.lora_rank > 0 and init.lora and (init.config.model.lora_rank, init.config.model.lora_alpha) != (
            cfg.model.lora_rank, cfg.model.lora_alpha):
        raise UsageError(f"model.lora_rank/alpha must match {init.spec}'s ({init.config.model.lora_rank}, "
                         f"{init.config.model.lora_alpha})")


def _check_world(cfg: RunConfig, run: Run, key: str) -> None:
    if run.world != cfg.world.name:
        raise UsageError(f"{key}={run.spec} is a {run.world!r}-world run, but this run's world is "
                         f"{cfg.world.name!r}: start from a run of the same world")
    if cfg.world.name == "wan" and run.lora and run.config.world.wan.model != cfg.world.wan.model:
        raise UsageError(f"{run.spec} adapts another base model ({run.config.world.wan.model}) than "
                         f"world.wan.model ({cfg.world.wan.model})")


def _named_teacher(cfg: RunConfig) -> str | None:
    key = cfg.spec.teacher_key
    if key is None:
        return None
    section, field = key.split(".")
    return getattr(cfg.sections[section], field)


def _imports_a_student(cfg: RunConfig) -> bool:
    """A wan-world run on a released AnyFlow folder: its transformer is already a student (Stage 1 or 2 with
    LoRA continue training it), or the raw Wan model starts Stage 1."""
    if cfg.world.name != "wan" or cfg.kind not in ("stage1", "stage2"):
        return False
    from .models.folder import transformer_kind
    folder_kind = transformer_kind(cfg.world.wan.model) if cfg.world.wan.model else "wan"
    return cfg.kind == "stage1" or (folder_kind != "wan" and cfg.model.lora_rank > 0)


def _lora_base(cfg: RunConfig, init: Run | None, teacher: Run | None) -> Run | str:
    """The frozen base of LoRA roles: the model folder (wan world, official), else the full-weight teacher run the
    chain starts from; a LoRA teacher run must adapt that same base."""
    if cfg.world.name == "wan":
        if not cfg.world.wan.model:
            raise UsageError("world.wan.model is not set: give a local Wan2.1 T2V diffusers folder")
        return cfg.world.wan.model
    if cfg.kind == "teacher":
        raise UsageError("a LoRA teacher run needs a pretrained base: world.name=wan with world.wan.model")
    base = next((r for r in chain(init) if r.kind == "teacher" and not r.lora), None)
    if base is None:
        raise UsageError(f"model.lora_rank > 0 in the {cfg.world.name!r} world needs a full-weight teacher run "
                         "in the model.init chain (the frozen base)")
    if teacher is not None and not teacher.lora and teacher.path != base.path:
        raise UsageError(f"teacher {teacher.spec} is a full fine-tune of other weights than the base "
                         f"{base.spec}; with LoRA roles the teacher is the base itself or a LoRA teacher run on it")
    return base
