"""The step-scaling sweep of trained runs: every run sampled its kind's way at every N, beside the teacher's
Euler sampler, on one evaluation set of their world, scored by its judge (the wan world: against the teacher's
many-step samples of that set, :mod:`anystep.evaluate.real_judge`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..api import load
from ..build import build_world, load_model, resolve_device
from ..causal import is_causal
from ..config import ConfigError, RunConfig, from_dict, resolve, to_dict
from ..errors import UsageError
from ..evaluate.real_judge import reference_judge
from ..evaluate.sweep import Sampler, SweepConfig, markdown_table, run_sweep
from ..lineage import Run, nearest_teacher, open_run, resolve_lineage
from ..models import zoo
from ..models.folder import transformer_kind


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


def is_exported(spec: str) -> bool:
    """Whether ``spec`` is an exported (or released) AnyFlow diffusers folder rather than a run."""
    p = Path(spec)
    return (p / "model_index.json").is_file() and not (p / "config.yaml").is_file() and not (p / "checkpoints").is_dir()


def exported_sampler(folder: str, world: dict[str, Any]) -> tuple[Sampler, RunConfig]:
    """The student of an exported AnyFlow folder (``anystep export``; its LoRA adapter applied when exported
    with ``--adapters``) as a sweep row, and a wan-world config for it: ``world`` gives ``model`` (the Wan2.1
    folder it was distilled from: the teacher and the VAE) and ``data`` (a latent cache: the prompts)."""
    from ..export import LORA_WEIGHT_NAME, import_anyflow
    from ..models.far import CausalStudent
    from ..models.wan import AnyFlowStudent

    missing = [k for k in ("model", "data") if not world.get(k)]
    if missing:
        raise UsageError(f"sweeping the exported folder {folder} needs world.wan.{missing[0]}=... (world.wan.model: "
                         "the Wan2.1 folder it was distilled from, the teacher; world.wan.data: a latent cache)")
    unknown = sorted(set(world) - {"model", "data", "max_text_len"})
    if unknown:
        raise UsageError(f"unknown setting world.wan.{unknown[0]} (world.wan.model, .data, .max_text_len)")
    transformer = import_anyflow(folder)
    if (Path(folder) / LORA_WEIGHT_NAME).is_file():
        transformer.load_lora_adapter(folder, weight_name=LORA_WEIGHT_NAME, prefix="transformer")
    model = CausalStudent(transformer) if transformer_kind(folder) == "anyflow_far" else AnyFlowStudent(transformer)
    cfg = resolve("wan1.3b_stage2", [*(f"world.wan.{k}={v}" for k, v in world.items()), "model.init=null",
                                     "stage2.teacher=null"])
    return Sampler("student", model.eval(), cfg.sweep.student_guidance), cfg


def teacher_sampler(cfg: RunConfig, first: str | None, teacher: str | None, world: Any) -> Sampler | None:
    """The teacher's Euler sampler with CFG: the world's exact teacher, else ``teacher`` or the first run's
    nearest teacher run (wan world: its named teacher run, else the bare base model of ``world.wan.model``,
    the teacher of a LoRA run on the raw model)."""
    exact = world.exact_teacher()
    if exact is not None:
        return Sampler("teacher (exact) Euler", exact, cfg.sweep.teacher_guidance, "euler")
    spec = teacher or (getattr(_run_teacher(first, world), "spec", None) if first is not None else None)
    if spec is None and world.name == "wan":
        try:
            base = zoo.velocity_network("wan", None, {"folder": world.model_folder()}).eval()
        except TypeError as err:   # an AnyFlow folder: a student, no teacher
            raise UsageError(f"world.wan.model: {err}; the teacher is a Wan2.1 folder (or name a teacher run with "
                             "--teacher)") from None
        return Sampler("teacher (base) Euler", base, cfg.sweep.teacher_guidance, "euler")
    if spec is None:
        raise UsageError(f"no teacher run in the model.init chain of {first}: name one with --teacher")
    model, _, _ = load_model(spec, role="teacher")
    return Sampler("teacher Euler", model, cfg.sweep.teacher_guidance, "euler")


def _run_teacher(first: str, world: Any) -> Run | None:
    """The first run's teacher run: the nearest along its ``model.init`` chain; in the wan world, where a LoRA
    student's teacher is often named (``stage2.teacher``), the one its lineage names."""
    run = open_run(first)
    nearest = nearest_teacher(run)
    if nearest is None and world.name == "wan":
        return resolve_lineage(run.config).teacher
    return nearest


def causal_partition(samplers: Sequence[Sampler]) -> tuple[int, ...] | None:
    """The chunk partition of the causal students among ``samplers`` (they must agree), or None."""
    parts = {s.model.chunk_partition for s in samplers if is_causal(s.model)}
    if len(parts) > 1:
        raise UsageError(f"the causal students generate different chunk partitions {sorted(parts)}; sweep them apart")
    return parts.pop() if parts else None


def sweep(runs: Sequence[str], *, labels: Sequence[str] | None = None, teacher: str | None = None,
          settings: dict[str, Any] | None = None, out: str | Path | None = None, world: dict[str, Any] | None = None,
          progress: bool = True) -> SweepResult:
    """Sweep ``runs`` (run or checkpoint folders, ``shipped:<name>``; or exported AnyFlow folders, with ``world``
    giving their ``world.wan`` settings) over N with the first run's ``sweep`` settings (``settings`` overrides
    fields, e.g. ``{"steps": (1, 4)}``) into ``out`` (default: the first run's folder / ``sweep``). Rows are
    labelled by kind (with the run folder's name when several runs are swept)."""
    names = list(labels) if labels else [None] * len(runs)
    exported = [is_exported(spec) for spec in runs]
    if any(exported) and not all(exported):
        raise UsageError("sweep exported folders apart from runs (a run keeps its own world; an exported folder "
                         "takes world.wan.model and world.wan.data)")
    if world and not all(exported):
        raise UsageError("world.wan.* settings are for sweeping exported folders; a run keeps its own world")
    loaded = [exported_sampler(spec, world or {}) if exported[0] else run_sampler(spec) for spec in runs]
    cfg = loaded[0][1]
    for spec, (_, run_cfg) in zip(runs, loaded):
        if run_cfg.world != cfg.world:
            raise UsageError(f"{spec} was trained in another world than {runs[0]}; sweep them apart")
    samplers = [_labelled(s, spec, run_cfg, len(runs), name) for (s, run_cfg), spec, name in zip(loaded, runs, names)]
    world = build_world(cfg)
    config = sweep_settings(cfg.sweep, settings or {}, world.name)
    folder = Path(out) if out else _sweep_folder(runs[0])
    judge = world.judge()
    if judge is None and world.name == "wan":   # judged against the teacher's reference (evaluate/real_judge.py)
        reference = _on(teacher_sampler(cfg, None if exported[0] else runs[0], teacher, world), config.device)
        judge = reference_judge(world, reference, world.eval_set(config.num_samples, config.seed),
                                steps=config.teacher_steps, shift=config.shift, clip=config.clip,
                                device=config.device, cache=folder / "teacher_reference.safetensors",
                                batch_size=config.batch_size, progress=progress)
        if config.teacher:
            samplers.append(reference)
    elif judge is None:
        raise UsageError(f"the {world.name!r} world has no judge to sweep with")
    elif config.teacher and not (teacher is None and len(runs) == 1 and cfg.kind == "teacher"):
        samplers.append(teacher_sampler(cfg, runs[0], teacher, world))   # (a teacher run's own row is it)
    samplers = [_on(s, config.device) for s in samplers]
    rows = run_sweep(samplers, world, judge, config, folder, guidance=cfg.spec.guidance(cfg),
                     chunk_partition=causal_partition(samplers), progress=progress)
    return SweepResult(rows, folder)


def _on(sampler: Sampler, device: str) -> Sampler:
    """``sampler`` with its model moved to ``device`` (the sweep's; an exact teacher stays where it is)."""
    if isinstance(sampler.model, torch.nn.Module):
        sampler.model.to(device)
    return sampler


def sweep_settings(base: SweepConfig, settings: dict[str, Any], world: str) -> SweepConfig:
    """``base`` with ``settings`` (field -> value, as typed on the command line or given from Python) applied
    and checked; the real-path settings (``teacher_steps``, ``clip``) are refused in a world with its own judge,
    which would not use them."""
    try:
        config = from_dict(SweepConfig, {**to_dict(base), **settings}, "sweep.")
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sweep: {err}") from None
    wan_only = [k for k in ("teacher_steps", "clip") if k in settings or getattr(config, k) != getattr(
        SweepConfig, k)]
    if wan_only and world != "wan":
        raise UsageError(f"sweep.{wan_only[0]} is for the wan world (a student judged against its teacher's "
                         f"samples); the {world!r} world has its own judge")
    config = replace(config, device=str(resolve_device(config.device)))
    if config.clip is not None and not Path(config.clip).is_dir():
        raise UsageError(f"sweep.clip={config.clip}: no such folder (a local CLIP folder, e.g. "
                         "openai/clip-vit-base-patch32 saved with save_pretrained)")
    return config


def _labelled(sampler: Sampler, spec: str, cfg: RunConfig, runs: int, name: str | None) -> Sampler:
    """A row's name: the given one; with one run its role; else its kind and folder."""
    if name:
        return replace(sampler, name=name)
    if runs == 1:
        return replace(sampler, name=cfg.spec.product)
    return replace(sampler, name=f"{cfg.spec.label} ({Path(spec).name})")


def _sweep_folder(spec: str) -> Path:
    if is_exported(spec):
        return Path(spec) / "sweep"
    run_dir = open_run(spec).path
    return (run_dir.parent.parent if run_dir.parent.name == "checkpoints" else run_dir) / "sweep"
