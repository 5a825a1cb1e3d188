"""Where a training step's time goes: ``torch.profiler`` over anystep's ``Trainer.train_step``, every operator's
self time put in one cell of a (phase x operator class) table.

Used by ``benchmarks/wan_throughput.py --profile DIR`` (one Stage-1 and one Stage-2 step after the timed ones;
a Chrome trace per step beside the table) and so by ``benchmarks/gpu_check.py``. On a GPU the time is the
device (kernel) time the profiler attributes to each operator; on the CPU it is the operator's CPU self time.

Phases (the innermost scope an operator runs in):
  forward     the forward passes of the step (also the no-grad rollouts of Stage 2)
  backward    autograd's backward (the operators run by ``autograd::engine::evaluate_function: ...``)
  recompute   gradient checkpointing re-running a block's forward inside backward (a forward hook on every
              transformer block that sees autograd's graph task running: ``torch._C._current_graph_task_id()``)
  optimizer   ``Optimizer.step`` / ``zero_grad`` (AdamW), gradient clipping included where it is inside them
  ema         the EMA update after the step (the trainer's ``EMA.update``, wrapped in a scope here)

Operator classes (by operator name, and by scope for LoRA):
  attention   scaled-dot-product / flash / efficient / cuDNN / flex attention, forward and backward
  lora        the LoRA ``lora_A`` / ``lora_B`` linears (a scope opened by hooks on them), and in backward the
              operators of autograd nodes those linears created (matched by the profiler's sequence numbers)
  linear      every other matmul (``mm``, ``addmm``, ``bmm``, ``linear``, convolution: the patch embedding)
  norm/elementwise   norms, modulation, RoPE, activations, softmax-free elementwise math, reductions
  copy        dtype casts and copies (``copy_``, ``_to_copy``, host<->device memcpy)
  sync        operators that wait for the device (``item`` / ``_local_scalar_dense``, stream or device
              synchronisation): their count is reported too; each one stalls the host until the device is idle
  other       the rest (views, allocation, indexing)

The table is the answer to "attention, linears, LoRA, norms/modulation/RoPE, optimizer, host-device copies and
synchronisations, recomputation": read a row for a phase, a column for an operator class.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function

PHASES = ("forward", "backward", "recompute", "optimizer", "ema")
CLASSES = ("attention", "lora", "linear", "norm/elementwise", "copy", "sync", "other")
RECOMPUTE, LORA, EMA_SCOPE = "anystep::recompute", "anystep::lora", "anystep::ema"
_BACKWARD_NODE = "autograd::engine::evaluate_function: "

_ATTENTION = re.compile(r"attention|flash|flex|sdpa", re.IGNORECASE)
_LINEAR = re.compile(r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|_addmm_activation|convolution|"
                     r"mkldnn_convolution|cudnn_convolution|_convolution|convolution_backward|"
                     r"_scaled_mm|addmv|mv)$")
_COPY = re.compile(r"^aten::(copy_|_to_copy|to|clone|contiguous)$|memcpy|Memcpy", re.IGNORECASE)
_SYNC = re.compile(r"^aten::(item|_local_scalar_dense)$|Synchronize|cudaStreamWaitEvent", re.IGNORECASE)
_ELEMENTWISE = re.compile(
    r"norm|^aten::(add|add_|sub|sub_|mul|mul_|div|div_|addcmul|addcmul_|addcdiv|addcdiv_|lerp_|lerp|pow|rsqrt|"
    r"sqrt|exp|log|neg|abs|sin|cos|sigmoid|silu|gelu|tanh|softmax|_softmax|where|clamp|clamp_|sum|mean|"
    r"linalg_vector_norm|_foreach_\w+|view_as_complex|view_as_real|complex|polar|cat|stack|fill_|zero_|"
    r"threshold_backward|gelu_backward|silu_backward|sigmoid_backward|_fused_adamw_|_fused_adam_|maximum|"
    r"minimum|reciprocal|square|var_mean|sgn|sign|masked_fill|masked_fill_)$", re.IGNORECASE)


def op_class(name: str) -> str:
    """The operator class of an operator name (LoRA is decided by scope, not by name)."""
    if _SYNC.search(name):
        return "sync"
    if _ATTENTION.search(name):
        return "attention"
    if _LINEAR.search(name):
        return "linear"
    if _COPY.search(name):
        return "copy"
    if _ELEMENTWISE.search(name):
        return "norm/elementwise"
    return "other"


# --------------------------------------------------------------------------------------------------
# scopes: hooks that label LoRA linears and recomputed blocks, and the EMA update
# --------------------------------------------------------------------------------------------------
def _scoped(module: nn.Module, name: str, when: Callable[[], bool] = lambda: True) -> Callable[[], None]:
    """Run ``module``'s forward inside ``record_function(name)`` whenever ``when()``; returns the undo. The scope
    wraps the forward itself, not hooks: checkpointing stops a recomputation early by raising inside the block,
    which a context manager survives and a forward post-hook would never see."""
    forward = module.forward

    def scoped(*args, **kwargs):
        if not when():
            return forward(*args, **kwargs)
        with record_function(name):
            return forward(*args, **kwargs)

    module.forward = scoped
    return lambda: module.__dict__.pop("forward", None)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@contextmanager
def scopes(model: nn.Module, blocks: list[nn.Module], trainer: Any) -> Iterator[None]:
    """Label, for the profiler, LoRA linears of ``model`` (peft's ``lora_A`` / ``lora_B``), the recomputation of
    ``blocks`` (a block's forward while autograd runs backward) and the trainer's EMA updates."""
    undo = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name):
            undo.append(_scoped(module, LORA))
    for block in blocks:
        undo.append(_scoped(block, RECOMPUTE, _in_backward))
    updates = {role: ema.update for role, ema in trainer.emas.items()}

    def scoped_update(update):
        def run(*args, **kwargs):
            with record_function(EMA_SCOPE):
                return update(*args, **kwargs)
        return run

    for role, ema in trainer.emas.items():
        ema.update = scoped_update(updates[role])
    try:
        yield
    finally:
        for u in undo:
            u()
        for role, ema in trainer.emas.items():
            ema.update = updates[role]


# --------------------------------------------------------------------------------------------------
# the breakdown
# --------------------------------------------------------------------------------------------------
def _ancestors(event) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _phase(event) -> tuple[str, Any]:
    """The phase of an event and its nearest backward node (None outside backward)."""
    node = None
    for a in _ancestors(event):
        if a.name == RECOMPUTE:
            return "recompute", None
        if a.name == EMA_SCOPE:
            return "ema", None
        if a.name.startswith("Optimizer."):
            return "optimizer", None
        if node is None and a.name.startswith(_BACKWARD_NODE):
            node = a
    if event.name.startswith("Optimizer."):
        return "optimizer", None
    return ("backward", node) if node is not None or event.name.startswith(_BACKWARD_NODE) else ("forward", None)


def breakdown(events: list[Any], device_time: bool) -> dict[str, Any]:
    """Milliseconds per (phase, operator class) of a profiler's events (``prof.events()``): each operator's
    *self* time, so nothing is counted twice; ``device_time`` takes the kernel time on the device (GPU) instead
    of the CPU time. Also the number of syncing operators."""
    lora_nodes = set()   # sequence numbers of the autograd nodes made by forward operators inside a LoRA scope
    for e in events:
        if e.sequence_nr >= 0 and any(a.name == LORA for a in _ancestors(e)):
            lora_nodes.add(e.sequence_nr)
    table: dict[str, dict[str, float]] = {p: defaultdict(float) for p in PHASES}
    syncs = 0
    for e in events:
        if e.name in (RECOMPUTE, LORA, EMA_SCOPE):
            continue
        own = (e.self_device_time_total if device_time else e.self_cpu_time_total) / 1e3
        phase, node = _phase(e)
        cls = op_class(e.name)
        syncs += cls == "sync" and e.name.startswith("aten::_local_scalar_dense")
        if cls in ("linear", "norm/elementwise", "copy", "other") and (
                any(a.name == LORA for a in _ancestors(e)) or (node is not None and node.sequence_nr in lora_nodes)):
            cls = "lora"
        if own > 0:
            table[phase][cls] += own
    rows = {p: {c: round(table[p].get(c, 0.0), 3) for c in CLASSES} for p in PHASES}
    total = sum(sum(r.values()) for r in rows.values())
    return {"unit": "ms", "time": "device" if device_time else "cpu", "rows": rows, "total_ms": round(total, 3),
            "host_syncs": syncs}


def profile_step(trainer: Any, model: nn.Module, blocks: list[nn.Module], device: torch.device,
                 trace: Path | None = None) -> dict[str, Any]:
    """One ``trainer.train_step()`` under the profiler, with :func:`scopes` on ``model`` and its ``blocks``: the
    :func:`breakdown`, the step's wall time, and the Chrome trace written to ``trace`` when given."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with scopes(model, blocks, trainer), profile(activities=activities) as prof:
        _sync(device)
        start = time.perf_counter()
        trainer.train_step()
        _sync(device)
        wall = time.perf_counter() - start
    trainer.step += 1
    out = breakdown(prof.events(), device_time=device.type == "cuda")
    out["wall_ms"] = round(wall * 1e3, 3)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        out["trace"] = str(trace)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(result: dict[str, Any], title: str) -> str:
    """A markdown table of a :func:`breakdown`: phases as rows, operator classes as columns, in ms and as a share of
    the step's profiled time."""
    rows, total = result["rows"], result["total_ms"] or 1.0
    lines = [f"{title}: {result['time']} time {result['total_ms']:.1f} ms profiled"
             + (f", wall {result['wall_ms']:.1f} ms" if "wall_ms" in result else "")
             + f", {result['host_syncs']} host syncs",
             "| phase | " + " | ".join(CLASSES) + " | all |", "|---" * (len(CLASSES) + 2) + "|"]
    for phase in PHASES:
        cells = [rows[phase][c] for c in CLASSES]
        lines.append(f"| {phase} | " + " | ".join(f"{v:.1f} ({100 * v / total:.0f}%)" for v in cells)
                     + f" | {sum(cells):.1f} ({100 * sum(cells) / total:.0f}%) |")
    sums = [sum(rows[p][c] for p in PHASES) for c in CLASSES]
    lines.append("| all | " + " | ".join(f"{v:.1f} ({100 * v / total:.0f}%)" for v in sums) + f" | {total:.1f} |")
    return "\n".join(lines)


def write(results: dict[str, dict[str, Any]], out_dir: Path) -> Path:
    """``profile.json`` (every step's breakdown) and ``profile.md`` (their tables) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "profile.md").write_text("\n\n".join(format_table(r, name) for name, r in results.items()) + "\n")
    return out_dir / "profile.json"
