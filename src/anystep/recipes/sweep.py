"""The step-scaling sweep of trained runs: every run sampled its kind's way at every N, beside the teacher's
Euler sampler, on one evaluation set of their world, scored by its judge."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..api import load
from ..build import build_world, load_model
from ..causal import is_causal
from ..config import RunConfig
from ..errors import UsageError
from ..evaluate.sweep import Sampler, SweepConfig, markdown_table, run_sweep
from ..lineage import nearest_teacher, open_run


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    out: Path

    @property
    def table(self) -> str:
        return markdown_table(self.rows)


def run_sampler(spec: str) -> tuple[Sampler, RunConfig]:
    """A trained run's product as a sweep row named after its kind: sampled its kind's way (a causal student
    chunk by chunk), a student with its fused guidance (1), a teacher with the run's ``sweep.teacher_guidance``
    (:class:`~anystep.api.Model`'s defaults)."""
    model = load(spec)
    return Sampler(model.config.spec.label, model.network, model.guidance, model.sampler), model.config


def teacher_sampler(cfg: RunConfig, first: str, teacher: str | None, world: Any) -> Sampler | None:
    """The teacher's Euler sampler with CFG: the world's exact teacher, else ``teacher`` or the first run's
    nearest teacher run."""
    exact = world.exact_teacher()
    if exact is not None:
        return Sampler("teacher (exact) Euler", exact, cfg.sweep.teacher_guidance, "euler")
    spec = teacher or getattr(nearest_teacher(open_run(first)), "spec", None)
    if spec is None:
        raise UsageError(f"no teacher run in the model.init chain of {first}: name one with --teacher")
    model, _, _ = load_model(spec, role="teacher")
    return Sampler("teacher Euler", model, cfg.sweep.teacher_guidance, "euler")


def causal_partition(samplers: Sequence[Sampler]) -> tuple[int, ...] | None:
    """The chunk partition of the causal students among ``samplers`` (they must agree), or None."""
    parts = {s.model.chunk_partition for s in samplers if is_causal(s.model)}
    if len(parts) > 1:
        raise UsageError(f"the causal students generate different chunk partitions {sorted(parts)}; sweep them apart")
    return parts.pop() if parts else None


def sweep(runs: Sequence[str], *, labels: Sequence[str] | None = None, teacher: str | None = None,
          settings: dict[str, Any] | None = None, out: str | Path | None = None,
          progress: bool = True) -> SweepResult:
    """Sweep ``runs`` (run or checkpoint folders, ``shipped:<name>``) over N with the first run's ``sweep``
    settings (``settings`` overrides fields, e.g. ``{"steps": (1, 4)}``) into ``out`` (default: the first run's
    folder / ``sweep``). Rows are labelled by kind (with the run folder's name when several runs are swept)."""
    names = list(labels) if labels else [None] * len(runs)
    loaded = [run_sampler(spec) for spec in runs]
    cfg = loaded[0][1]
    for spec, (_, run_cfg) in zip(runs, loaded):
        if run_cfg.world != cfg.world:
            raise UsageError(f"{spec} was trained in another world than {runs[0]}; sweep them apart")
    samplers = [_labelled(s, spec, run_cfg, len(runs), name) for (s, run_cfg), spec, name in zip(loaded, runs, names)]
    world = build_world(cfg)
    judge = world.judge()
    if judge is None:
        raise UsageError(f"the {world.name!r} world has no judge to sweep with: export the student (`anystep export`) "
                         "and sample it with diffusers' AnyFlowPipeline")
    config: SweepConfig = replace(cfg.sweep, **(settings or {}))
    if config.teacher:
        samplers.append(teacher_sampler(cfg, runs[0], teacher, world))
    folder = Path(out) if out else _sweep_folder(runs[0])
    rows = run_sweep(samplers, world, judge, config, folder, guidance=cfg.spec.guidance(cfg),
                     chunk_partition=causal_partition(samplers), progress=progress)
    return SweepResult(rows, folder)


def _labelled(sampler: Sampler, spec: str, cfg: RunConfig, runs: int, name: str | None) -> Sampler:
    """A row's name: the given one; with one run its role; else its kind and folder."""
    if name:
        return replace(sampler, name=name)
    if runs == 1:
        return replace(sampler, name=cfg.spec.product)
    return replace(sampler, name=f"{cfg.spec.label} ({Path(spec).name})")


def _sweep_folder(spec: str) -> Path:
    run_dir = open_run(spec).path
    return (run_dir.parent.parent if run_dir.parent.name == "checkpoints" else run_dir) / "sweep"
