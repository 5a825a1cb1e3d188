"""Release a trained wan-world student as a diffusers pipeline folder, and a teacher run as a Wan transformer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..build import load_model
from ..config import RunConfig
from ..errors import UsageError
from ..lineage import open_run


def export_run(spec: str, out: str | Path, *, adapters: bool = False, dtype: torch.dtype | None = None,
               overwrite: bool = False, shift: float = 5.0) -> Path:
    """Export a wan-world student (its EMA weights) as a diffusers ``AnyFlowPipeline`` folder
    (``AnyFlowFARPipeline`` for a causal student): LoRA merged, or with ``adapters=True`` the base plus a LoRA
    file for ``pipe.load_lora_weights``."""
    from ..export import export_pipeline, export_student

    cfg = open_run(spec).config
    refusal = not_exportable(cfg)
    if refusal:
        raise UsageError(f"{spec} {refusal}")
    student, _, _ = load_model(spec, role="student")
    kwargs = {"shift": shift, "overwrite": overwrite, "dtype": dtype}
    if cfg.model.lora_rank > 0:
        return export_student(student.shared, cfg.world.wan.model, out, as_adapter=adapters, **kwargs)
    if adapters:
        raise UsageError(f"{spec} is a full fine-tune (model.lora_rank=0): it has no adapters to keep")
    return export_pipeline(student.transformer, cfg.world.wan.model, out, **kwargs)


def not_exportable(cfg: RunConfig) -> str | None:
    """Why a run with config ``cfg`` cannot be exported (a phrase following the run's name), or None when it can."""
    if cfg.world.name != "wan":
        return (f"is a {cfg.world.name!r}-world run; export writes an AnyFlowPipeline folder (VAE, text encoder, "
                "transformer), so it takes runs trained with world.name=wan")
    if cfg.spec.sampler != "flowmap":
        return (f"is a {cfg.kind!r} run sampled by {cfg.spec.sampler!r}; AnyFlowPipeline samples flow maps (export "
                "a Stage-1 or Stage-2 run)")
    return None


def teacher_transformer(spec: str, model_folder: str | None = None):
    """A teacher run's velocity model as a plain ``WanTransformer3DModel`` (LoRA merged, EMA weights), e.g. to
    synthesize training data with diffusers' ``WanPipeline``."""
    from ..models.wan import wan_from_student

    teacher, cfg, _ = load_model(spec, role="teacher")
    if cfg.kind != "teacher":
        raise UsageError(f"{spec} is a {cfg.kind!r} run, not a teacher run")
    if model_folder and cfg.world.name == "wan" and Path(cfg.world.wan.model).resolve() != Path(model_folder).resolve():
        raise UsageError(f"{spec} fine-tuned {cfg.world.wan.model}, not {model_folder}")
    if cfg.model.lora_rank > 0:
        return wan_from_student(teacher.shared.merged("teacher"))
    return teacher.transformer
