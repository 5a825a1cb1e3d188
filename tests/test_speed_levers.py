"""The GPU speed levers are switches that leave the numbers as they were (to float tolerance), checked on CPU:
fused AdamW, diffusers' attention backend, regional torch.compile of the transformer blocks (bidirectional and
causal; the causal path's compiled flex attention and mask cache are tests/test_far_speed.py), selective
activation checkpointing. (Their speed is measured on a GPU by the benchmarks; here only that each one is
applied and changes nothing it should not.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anystep.build import build_trainer
from anystep.config import ConfigError, resolve
from anystep.recipes import train
from anystep.train.checkpoint import find_checkpoint

FAST = ["train.threads=1", "train.log_every=1", "train.checkpoint_every=1000"]


def _run(preset: str, out: Path, *overrides: str) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    train(resolve(preset, [*FAST, f"train.out_dir={out}", *overrides]), progress=False)
    key = "loss/flow_matching" if preset.endswith("teacher") else "loss/stage1"
    with open(out / "metrics.csv") as f:
        losses = {int(r["step"]): float(r[key]) for r in csv.DictReader(f)}
    role = "teacher" if preset.endswith("teacher") else "student"
    return losses, load_file(str(find_checkpoint(out / "checkpoints") / f"{role}.safetensors"))


def assert_close_runs(a, b, rel: float, atol: float) -> None:
    (la, wa), (lb, wb) = a, b
    assert la.keys() == lb.keys()
    for step, value in la.items():
        assert lb[step] == pytest.approx(value, rel=rel), step
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=rel, atol=atol, msg=name)


def test_fused_adamw_takes_the_foreach_steps(tmp_path):
    steps = ["train.steps=8", "train.batch_size=64", "optim.teacher.warmup_steps=2"]
    fused_cfg = resolve("gmm_teacher", [*steps, "optim.teacher.fused=true"])
    assert build_trainer(fused_cfg, progress=False).optimizers["teacher"].defaults["fused"]   # the kernel runs
    plain = _run("gmm_teacher", tmp_path / "plain", *steps)
    fused = _run("gmm_teacher", tmp_path / "fused", *steps, "optim.teacher.fused=true")
    assert_close_runs(plain, fused, rel=1e-5, atol=1e-6)


def test_attention_backend_is_applied_and_changes_nothing(tmp_path):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    cfg = resolve("shapes_stage1", ["train.attention_backend=_native_math", "train.steps=1"])
    transformer = build_trainer(cfg, progress=False).method.roles["student"].transformer
    backends = {m.processor._attention_backend for m in transformer.modules() if hasattr(m, "processor")}
    assert {str(getattr(b, "value", b)) for b in backends} == {"_native_math"}
    assert _AttentionBackendRegistry.get_active_backend()[0] == default   # models built later keep the default
    steps = ["train.steps=3", "train.batch_size=4"]
    assert_close_runs(_run("shapes_stage1", tmp_path / "auto", *steps),
                      _run("shapes_stage1", tmp_path / "math", *steps, "train.attention_backend=_native_math"),
                      rel=1e-5, atol=1e-6)


def test_selective_checkpointing_trains_as_full_checkpointing(tmp_path):
    """train.checkpoint_fraction and train.checkpoint_save=attention against the official full checkpointing
    (tests/test_checkpointing.py counts what each recomputes)."""
    steps = ["train.steps=2", "train.batch_size=4", "train.gradient_checkpointing=true"]
    assert_close_runs(_run("shapes_stage1", tmp_path / "full", *steps),
                      _run("shapes_stage1", tmp_path / "selective", *steps, "train.checkpoint_fraction=0.5",
                           "train.checkpoint_save=attention"),
                      rel=1e-6, atol=1e-7)


@pytest.mark.slow   # inductor compiles the blocks' forward and backward on the CPU: about a minute
def test_compiled_blocks_train_as_eager_ones(tmp_path):
    cfg = resolve("shapes_stage1", ["train.compile=blocks", "train.steps=1"])
    transformer = build_trainer(cfg, progress=False).method.roles["student"].transformer
    assert all(block._compiled_call_impl is not None for block in transformer.blocks)
    steps = ["train.steps=2", "train.batch_size=4"]
    assert_close_runs(_run("shapes_stage1", tmp_path / "eager", *steps),
                      _run("shapes_stage1", tmp_path / "compiled", *steps, "train.compile=blocks"),
                      rel=1e-4, atol=1e-5)


def test_a_lever_that_cannot_apply_says_so(tmp_path):
    with pytest.raises(ConfigError, match="attention_backend must be 'auto' or one of"):
        resolve("shapes_stage1", ["train.attention_backend=fastest"])
    with pytest.raises(ConfigError, match="networks have none"):
        build_trainer(resolve("gmm_teacher", ["train.attention_backend=_native_math"]), progress=False)
    with pytest.raises(ConfigError, match="attention_backend does not apply to a causal"):
        build_trainer(resolve("shapes_far_stage1", ["train.attention_backend=_native_math"]), progress=False)
    with pytest.raises(ConfigError, match="flex_compile"):
        resolve("shapes_far_stage1", ["model.causal.attention=dense", "model.causal.flex_compile=false"])


@pytest.mark.slow   # inductor compiles the FAR blocks' forward and backward on the CPU: about a minute
def test_compiled_blocks_train_a_causal_student_as_eager_ones(tmp_path):
    """``train.compile=blocks`` on the causal (FAR) student of a causal Stage 1 (teacher forcing with the block
    mask, the dense path on CPU), against the eager run."""
    cfg = resolve("shapes_far_stage1", ["train.compile=blocks", "train.steps=1"])
    transformer = build_trainer(cfg, progress=False).method.roles["student"].transformer
    assert type(transformer).__name__ == "AnyFlowFARTransformer3DModel"
    assert all(block._compiled_call_impl is not None for block in transformer.blocks)
    steps = ["train.steps=2", "train.batch_size=4", "validation.every=0"]
    assert_close_runs(_run("shapes_far_stage1", tmp_path / "eager", *steps),
                      _run("shapes_far_stage1", tmp_path / "compiled", *steps, "train.compile=blocks"),
                      rel=1e-4, atol=1e-5)   # measured: losses equal to 1e-7
