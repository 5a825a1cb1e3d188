"""Throughput of Wan2.1-sized AnyFlow training, measured in one run: forward time, Stage-1 and Stage-2 step
time and peak memory, and bf16 model FLOP utilisation (MFU).

    python benchmarks/wan_throughput.py                        # Wan2.1-T2V-1.3B sized, on cuda if present
    python benchmarks/wan_throughput.py --size 14b             # Wan2.1-T2V-14B sized
    python benchmarks/wan_throughput.py --size tiny --device cpu --repeats 1   # CPU smoke run (seconds)
    python benchmarks/wan_throughput.py --causal --skip forward,stage1,stage2   # the causal (FAR) steps only

On a GPU machine: install the project (``pip install -e .``; no torchvision needed), then run the first line
(an estimated few minutes for 1.3B on an H100, most of it the Stage-2 steps; longer for 14B, whose Stage 2
is expected to fall back to fewer frames on 80 GB). Nothing is downloaded: the weights are random (cost does
not depend on them). ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` makes the memory numbers less
sensitive to fragmentation and the out-of-memory fallback more reliable.
``--json out.json`` also writes the rows; ``--peak-tflops`` sets the device's dense bf16 peak when the
built-in table (keyed on ``torch.cuda.get_device_name()``) does not know it.

Setup, as the official recipe trains (``wan1.3b_stage1`` / ``wan1.3b_stage2`` presets):
  model        a ``WanTransformer3DModel`` config (1.3B: 30 layers, 12 heads x 128, FFN 8960; 14B: 40 layers,
               40 heads x 128, FFN 13824; text_dim 4096, freq_dim 256, patch 1x2x2, 16 latent channels),
               made into the AnyFlow base (``AnyFlowTransformer3DModel``, delta embedder = copy of the time
               embedder, gate 0.25) directly on the device with random weights: the Wan model itself is only
               built on the meta device (config check, parameter count), so a 14B run never holds two copies.
  base dtype   the frozen base in bf16 (``--base-dtype``), except diffusers' ``_keep_in_fp32_modules`` (as
               ``from_pretrained(torch_dtype=torch.bfloat16)`` loads it); the LoRA adapters, their gradients,
               AdamW states and EMA in fp32 (the wan presets' ``model.base_dtype: bfloat16``;
               ``--base-dtype float32`` measures ``model.base_dtype=float32``).
  roles        anystep's ``SharedBase`` (what ``SharedBase.from_wan`` makes of the Wan model): LoRA r = alpha =
               256 (``--rank``) "student" (Stage 1; plus "critic" for Stage 2), teacher = the bare base;
               gradient checkpointing of every block (``--no-checkpointing`` to compare).
  trainer      anystep's ``Trainer(mixed_precision="bf16")`` with the kind's own optimizers (``OptimConfig``
               per trained role: Stage 1 the official teacher/Stage-1 AdamW, Stage 2 ``STAGE2_OPTIM``) and its
               product's EMA (``EMAConfig`` / ``STAGE2_EMA``); one step = ``Trainer.train_step``.
  data         random latents (B, 21, 16, 60, 104) for 81x480x832 and random text embeddings (B, 512, 4096),
               drawn on the CPU each step and copied to the device by anystep's ``OnDevice``.
  Stage 1      the stage1 kind's method (``kind("stage1").make``), official ``Stage1Config`` (fusion w = 3
               with a null branch, central difference, buckets 50/25/25), batch 1 (``--batch``). Its call count
               depends on the random bucket (r = t needs no difference points), so MFU uses the counted FLOPs
               of each timed step.
  Stage 2      the stage2 kind's method (``kind("stage2").make``), official ``Stage2Config`` (DMD with real
               guidance 3, co-trained Stage-1 loss, critic every iteration), DMD batch 2 (1.3B) / 1 (14B); the
               co-trained data batch is max(--batch, DMD batch). One step = one iteration = generator phase +
               critic phase. The rollout plan, random (N, k) in training, is FIXED here (``--plan N,K``, default
               4,1: k = 1 of a 4-step grid, the three-call rollout tau_0 -> tau_1 -> tau_2 -> 0; every N >= 3
               with 0 < k < N - 1 costs the same, k = 0 or N - 1 skips one call): the library's rollout is
               called with that plan instead of the one it draws.
  timing       median of ``--repeats`` (default 3) after ``--warmup`` (default 1), ``torch.cuda.synchronize``
               around each; peak memory = ``torch.cuda.max_memory_allocated`` over the timed steps (reset
               after warm-up, so weights, optimizer states and EMA are in it).
  --fsdp       the base and its adapters sharded by anystep's FSDP2 path (``train.parallel=fsdp``:
               ``fully_shard`` per block and root, bf16 gathered weights, fp32 reduction) in one process: what
               the sharding machinery costs in time and memory beside the unsharded rows (with W processes the
               weights per process shrink W-fold; one GPU cannot show that). Rows say "(FSDP2, 1 process)".
  --causal     also the causal (FAR) student's steps, each on its own FAR base (``AnyFlowFARTransformer3DModel``
               of the same config, compressed patch 1x4x4, full_chunk_limit 3, chunks [1, 3, ..., 3, rest]:
               [1, 3, 3, 3, 3, 3, 3, 2] at 21 latent frames; causal attention "auto": compiled flex on CUDA):
               "causal Stage 1" (teacher forcing, K chunks drawn as in training) and "causal Stage 2"
               (chunk-by-chunk KV-cache self-rollout on the fixed plan, bidirectional critic and teacher on
               the same base), same Stage-1/Stage-2 settings as above. Their FLOPs count each FAR call's
               tokens (compressed context, noisy chunks, clean copies; a chunk's own against the cache) and
               only the attention pairs its mask allows (:func:`far_forward_flops`).
  --lever      a speed lever by its training config key, as a run sets it (repeatable): train.attention_backend,
               train.compile, train.checkpoint_fraction, train.checkpoint_save, optim.fused (every trained
               role's ``OptimConfig``), model.causal.flex_compile (the causal rows); pulled by the library
               functions a run's builder calls, so an impossible combination is the same ConfigError. Every
               step's first warm-up step's losses are reported ("first-step loss/..."): same seed and batch, so
               a lever that changes the numerics shows there.
  --profile    one more Stage-1 and Stage-2 step under ``torch.profiler`` (``step_profile.py``): device time per
               phase (forward, backward, recompute, optimizer, EMA) x operator class (attention, LoRA, other
               linears, norms/modulation/RoPE/elementwise, copies, syncs), host syncs counted; DIR/profile.md,
               profile.json and Chrome traces. The breakdown on a GPU is to be written here from the first run
               of ``gpu_check.sh`` (none has run on a GPU yet).
  sizes        81x480x832 first; on ``torch.OutOfMemoryError`` the measurement is retried at 49, 33 and 17
               frames, then the same at 240x416 (``--sizes`` to choose); the table's size column says which
               size each row was measured at.

MFU = (model FLOPs of the timed steps) / (their wall time) / (the device's dense bf16 peak). Model FLOPs: a
forward hook on the base transformer records every call (batch, latent shape, text length, the active
adapter, and whether its output carries autograd history); a call's forward FLOPs are the base's plus its
active LoRA adapter's (r = 256 adds ~20 % (1.3B) or ~7 % (14B) to the block linears); a call with history counts 3x them
(forward + backward, the usual model-FLOPs convention), one without 1x. Gradient-checkpoint recomputation
is not counted (it re-runs blocks, never the hooked transformer), and neither is the fact that the frozen
base needs no weight gradients: the hardware executes somewhat different FLOPs than the model-FLOPs count.
The forward FLOP formula is :func:`forward_flops`. On a CPU, or an unknown GPU without ``--peak-tflops``,
MFU is n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, WanTransformer3DModel

from anystep.backward_simulation import RolloutPlan
from anystep.models import far_masks
from anystep.models.far_attention import set_causal_attention
from anystep.models.roles import SharedBase
from anystep.models.wan import _SHARED_KEYS
from anystep.train import sharding
from anystep.train.distributed import Processes

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common, also when loaded as a module (gpu_check)
import step_profile
from _common import make_method, pin_plan, random_world, step_times, trainer_for, with_section

_WAN_COMMON: dict[str, Any] = {"patch_size": (1, 2, 2), "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                                "freq_dim": 256, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
                                "eps": 1e-6, "rope_max_seq_len": 1024, "added_kv_proj_dim": None, "image_dim": None}
# Wan2.1-T2V-1.3B / -14B transformer configs (diffusers' transformer/config.json of the released models).
WAN_CONFIGS: dict[str, dict[str, Any]] = {
    "1.3b": {**_WAN_COMMON, "num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128,
             "ffn_dim": 8960},
    "14b": {**_WAN_COMMON, "num_layers": 40, "num_attention_heads": 40, "attention_head_dim": 128,
            "ffn_dim": 13824},
    "tiny": {**_WAN_COMMON, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64,
             "text_dim": 32},
}
_SIZES_480 = ("81x480x832", "49x480x832", "33x480x832", "17x480x832")
_SIZES_240 = ("81x240x416", "49x240x416", "33x240x416", "17x240x416")
DEFAULT_SIZES = {"1.3b": _SIZES_480 + _SIZES_240, "14b": _SIZES_480 + _SIZES_240, "tiny": ("9x32x32",)}
DMD_BATCH = {"1.3b": 2, "14b": 1, "tiny": 2}      # official Stage-2 rollouts per generator step
VAE_STRIDE = (4, 8, 8)                            # Wan2.1 VAE: frames 1 + 4k -> 1 + k latent frames, /8 spatial

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; first matching substring.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
                    ("H100", 989.4), ("H800", 989.4), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.05))

GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------------
# sizes and FLOPs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoSize:
    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> VideoSize:
        try:
            f, h, w = (int(v) for v in text.lower().split("x"))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"a size is FRAMESxHEIGHTxWIDTH, e.g. 81x480x832; got {text!r}") from err
        ft, hs, ws = VAE_STRIDE
        if (f - 1) % ft or h % (2 * hs) or w % (2 * ws):
            raise argparse.ArgumentTypeError(f"size {text}: frames must be 1 + 4k and height, width multiples of "
                                             "16 (VAE stride 4x8x8, patch 1x2x2)")
        return cls(f, h, w)

    @property
    def latent(self) -> tuple[int, int, int]:
        ft, hs, ws = VAE_STRIDE
        return 1 + (self.frames - 1) // ft, self.height // hs, self.width // ws

    def tokens(self, patch: Sequence[int]) -> int:
        f, h, w = self.latent
        return (f // patch[0]) * (h // patch[1]) * (w // patch[2])

    def label(self, patch: Sequence[int]) -> str:
        f, h, w = self.latent
        return f"{self.frames}x{self.height}x{self.width} (latent {f}x{h}x{w}, {self.tokens(patch)} tokens)"


def forward_flops(cfg: dict[str, Any], frames: int, height: int, width: int, text_len: int,
                  lora: Sequence[tuple[int, int, bool]] = (), rank: int = 0) -> dict[str, float]:
    """Analytic FLOPs of one forward call of the AnyFlow/Wan transformer for one sample (multiply-add = 2).

    With N = (F/pt)(H/ph)(W/pw) video tokens of a latent F x H x W, L text tokens, d = heads x head_dim,
    f = ffn_dim, l = layers, C channels, k = pt ph pw, D = text_dim, T = freq_dim::

        linear    = 2 N [l (4d^2 + 2d^2 + 2 d f) + 2 C k d]     self-attn q,k,v,o; cross-attn q,o; FFN;
                                                               patch embedding and proj_out
                  + 2 L [l 2d^2 + D d + d^2]                   cross-attn k,v and the text embedder act on
                                                               the L text tokens, not the N video tokens
                  + 2 F [2 (T d + d^2) + 6 d^2]                time and delta embedders, time_proj: per frame
        attention = l (4 N^2 d + 4 N L d)                      QK^T and AV of self- and cross-attention
        lora      = sum over the active adapter's targets of 2 tokens r (in + out)   (tokens = N for block
                                                               linears, F for the per-frame time embedders)

    Norms, modulation, RoPE, activations and softmax (O(N d) each) are left out. ``lora`` lists
    (in_features, out_features, per_token) of the adapter's target linears. Returns the parts and "total".
    """
    pt, ph, pw = cfg["patch_size"]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, layers, c, k = cfg["ffn_dim"], cfg["num_layers"], cfg["in_channels"], pt * ph * pw
    n = (frames // pt) * (height // ph) * (width // pw)
    linear = (2 * n * (layers * (6 * d * d + 2 * d * f) + 2 * c * k * d)
              + 2 * text_len * (layers * 2 * d * d + cfg["text_dim"] * d + d * d)
              + 2 * frames * (2 * (cfg["freq_dim"] * d + d * d) + 6 * d * d))
    attention = layers * (4 * n * n * d + 4 * n * text_len * d)
    lora_flops = sum(2 * (n if per_token else frames) * rank * (i + o) for i, o, per_token in lora)
    parts = {"linear": float(linear), "attention": float(attention), "lora": float(lora_flops)}
    parts["total"] = sum(parts.values())
    return parts


def adapter_linears(shared: SharedBase, adapter: str) -> list[tuple[int, int, bool]]:
    """(in_features, out_features, per_token) of each target linear of ``adapter``."""
    out = []
    for path in shared.adapters[adapter].targets:
        layer = shared.base.get_submodule(path).get_base_layer()
        out.append((layer.in_features, layer.out_features, path.startswith("blocks.")))
    return out


@dataclass
class Call:
    batch: int
    latent: tuple[int, int, int]
    text_len: int
    backward: bool          # the output carries autograd history: forward + backward = 3x
    adapter: str | None


class ForwardCounter:
    """Records every call of the shared base transformer (forward hook) and turns them into model FLOPs."""

    def __init__(self, shared: SharedBase, cfg: dict[str, Any]):
        self.shared, self.cfg, self.calls = shared, cfg, []
        self.lora = {name: adapter_linears(shared, name) for name in shared.adapters}
        self.handle = shared.base.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        x, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]   # (B, F, C, H, W), (B, L, D)
        out = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append(Call(x.shape[0], (x.shape[1], x.shape[3], x.shape[4]), text.shape[1],
                               out.requires_grad, self.shared.active_adapter))

    def call_flops(self, call: Call) -> float:
        rank = self.shared.adapters[call.adapter].rank if call.adapter else 0
        per_sample = forward_flops(self.cfg, *call.latent, call.text_len, self.lora.get(call.adapter, ()), rank)
        return call.batch * per_sample["total"]

    def model_flops(self) -> float:
        return sum((3 if c.backward else 1) * self.call_flops(c) for c in self.calls)

    def forward_equivalents(self) -> int:
        """Sample-forwards per step, a call with backward counting 3."""
        return sum((3 if c.backward else 1) * c.batch for c in self.calls)

    def reset(self) -> None:
        self.calls = []

    def remove(self) -> None:
        self.handle.remove()


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def wan_on_meta(cfg: dict[str, Any]) -> WanTransformer3DModel:
    """The Wan transformer of ``cfg`` without memory (config validation, parameter count)."""
    with torch.device("meta"):
        return WanTransformer3DModel(**cfg)


def build_shared(wan_config, device: torch.device, dtype: torch.dtype, rank: int, roles: Sequence[str],
                 checkpointing: bool, fraction: float = 1.0, save: str = "none") -> SharedBase:
    """The frozen AnyFlow base of a Wan config (random weights, built on ``device`` in ``dtype`` except
    diffusers' keep-in-fp32 modules) in a :class:`SharedBase` with adapters for ``roles`` (fp32: the library
    keeps trainable weights in fp32); what ``SharedBase.from_wan`` makes of a Wan model, without materialising
    the Wan model. Gradient checkpointing: the first ``round(fraction * num_blocks)`` blocks, keeping their
    attention outputs with ``save="attention"`` (``train.checkpoint_fraction`` / ``train.checkpoint_save``)."""
    kwargs = {k: wan_config[k] for k in _SHARED_KEYS}
    with torch.device(device), default_dtype(dtype):
        base = AnyFlowTransformer3DModel(**kwargs, gate_value=0.25, deltatime_type="r")
    keep = base._keep_in_fp32_modules or []
    for name, p in base.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    emb = base.condition_embedder
    emb.delta_embedder.load_state_dict(emb.time_embedder.state_dict())   # student_from_wan's initialisation
    with torch.device(device):                       # LoRA weights initialised on the device
        shared = SharedBase(base, rank=rank, alpha=rank, roles=roles)
    shared.to(device)
    if checkpointing:
        shared.enable_gradient_checkpointing(fraction, save)
    return shared


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(shared: SharedBase | None, device: torch.device) -> None:
    if shared is not None:
        for p in shared.parameters():
            p.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def with_fallback(name: str, sizes: Sequence[VideoSize], run: Callable[[VideoSize], dict[str, Any]],
                  shared: SharedBase, device: torch.device, patch) -> tuple[VideoSize | None, dict[str, Any]]:
    """``run(size)`` at the first size that fits; on out-of-memory, free and try the next one."""
    for i, size in enumerate(sizes):
        failed = None
        try:
            return size, run(size)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            failed = type(err).__name__
        free_memory(shared, device)   # outside the except block: the traceback's frames are gone
        nxt = f"; retrying at {sizes[i + 1].label(patch)}" if i + 1 < len(sizes) else "; no smaller size left"
        print(f"{name}: {failed} at {size.label(patch)}{nxt}", flush=True)
    return None, {}


def time_forward(view, size: VideoSize, cfg: dict[str, Any], batch: int, text_len: int, device: torch.device,
                 warmup: int, repeats: int) -> list[float]:
    f, h, w = size.latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, f, cfg["in_channels"], h, w), generator=g).to(device)
    text = torch.randn((batch, text_len, cfg["text_dim"]), generator=g).to(device)
    t, r = torch.full((batch,), 750.0, device=device), torch.full((batch,), 250.0, device=device)
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for i in range(warmup + repeats):
            sync(device)
            start = time.perf_counter()
            view(x, t, r, text)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def time_steps(method, kind_name: str, counter: ForwardCounter, device: torch.device, warmup: int,
               repeats: int, optim: dict[str, Any] | None = None,
               profile: Callable[[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Seconds of each timed ``Trainer.train_step`` (the kind's optimizers and EMA, bf16 autocast; ``optim``:
    changes to every role's ``OptimConfig``), the model FLOPs and forward-equivalents counted in them, and the
    peak memory over them; ``profile(trainer)`` runs once after the timed steps (its result under "profile")."""
    flops, equivalents = [], []

    def count() -> None:
        flops.append(counter.model_flops())
        equivalents.append(counter.forward_equivalents())
        counter.reset()

    with trainer_for(method, kind_name, mixed_precision="bf16", optim=optim) as trainer:
        first = trainer.train_step() if warmup else {}   # the first step's statistics: the levers' numerics check
        trainer.step += bool(warmup)
        step_times(trainer, warmup - 1)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter.reset()
        times = step_times(trainer, repeats, sync=lambda: sync(device), after=count)
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        profiled = profile(trainer) if profile else None
    losses = {k: float(v) for k, v in first.items() if k.startswith("loss")}
    return {"times": times, "flops": sum(flops), "equivalents": statistics.median(equivalents), "peak_gib": peak,
            "profile": profiled, "first_losses": losses}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_BF16_TFLOPS if key.lower() in name.lower()), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------------
# the causal (FAR) rows (--causal)
# --------------------------------------------------------------------------------------------------
FAR_LAYOUT = {"compressed_patch_size": (1, 4, 4), "full_chunk_limit": 3}   # the wanfar presets' (official)


def far_partition(latent_frames: int) -> tuple[int, ...]:
    """The official chunking: a first chunk of 1 latent frame, then chunks of 3, the rest last (21 latent
    frames: [1, 3, 3, 3, 3, 3, 3, 2], the wanfar presets' ``model.causal.chunk_partition``)."""
    rest = latent_frames - 1
    return (1, *[3] * (rest // 3), *([rest % 3] if rest % 3 else []))


def far_shared(b: Bench, roles: Sequence[str]) -> SharedBase:
    """The frozen FAR base (``AnyFlowFARTransformer3DModel`` of the Wan config, random weights, on the device
    in the base dtype except diffusers' keep-in-fp32 modules) in a :class:`SharedBase`, as a causal LoRA run
    builds it (its compressed patch embedding trained fully by the student); causal attention ``auto``:
    compiled flex on CUDA (eager with ``--lever model.causal.flex_compile=false``), dense on the CPU; the
    ``train.*`` levers pulled as on the bidirectional base."""
    kwargs = {k: b.cfg[k] for k in _SHARED_KEYS}
    with torch.device(b.device), default_dtype(b.dtype):
        base = AnyFlowFARTransformer3DModel(**kwargs, gate_value=0.25, deltatime_type="r", chunk_partition=(1,),
                                            **FAR_LAYOUT)
    for name, p in base.named_parameters():
        if any(k in name.split(".") for k in base._keep_in_fp32_modules or []):
            p.data = p.data.float()
    emb = base.condition_embedder
    emb.delta_embedder.load_state_dict(emb.time_embedder.state_dict())
    set_causal_attention(base, "auto", flex_compile=b.args.levers.get("model.causal.flex_compile", True))
    with torch.device(b.device):
        shared = SharedBase(base, rank=b.args.rank, alpha=b.args.rank, roles=roles)
    shared.to(b.device)
    train = train_levers(b.args.levers)
    if b.checkpointing:
        shared.enable_gradient_checkpointing(train.get("checkpoint_fraction", 1.0), train.get("checkpoint_save", "none"))
    b.pull_levers(shared, roles)
    return shared


@dataclass
class FARCall(Call):
    tokens: int = 0         # per sample: compressed context + noisy + clean copies, or a cached chunk's own
    compressed: int = 0     # of them compressed (patch 1x4x4)
    outputs: int = 0        # of them projected out (noisy ones; none in a prefill)
    pairs: int = 0          # self-attention query-key pairs the mask allows (cached chunk: N x (cache + N))
    frames: int = 0         # frames with a time embedding


class FARCounter(ForwardCounter):
    """:class:`ForwardCounter` for the FAR base: every call's tokens and allowed attention pairs (teacher
    forcing, KV-cache prefill, a chunk against the cache, the bidirectional mode) into :func:`far_forward_flops`."""

    def __init__(self, shared: SharedBase, cfg: dict[str, Any]):
        super().__init__(shared, cfg)
        self.layouts: dict[far_masks.Layout, tuple[int, int]] = {}

    def _hook(self, module, args, kwargs, output):
        x, text, clean = kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs.get("clean_hidden_states")
        flag = kwargs.get("kv_cache_flag") or {}
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", None)
        frames, height, width = x.shape[1], x.shape[3], x.shape[4]
        if kwargs.get("kv_cache") is not None and not flag.get("is_cache_step"):   # a chunk against the cache
            n = frames * (height // self.cfg["patch_size"][1]) * (width // self.cfg["patch_size"][2])
            sizes = (n, 0, n, n * (n + flag["num_cached_full_tokens"] + flag["num_cached_compressed_tokens"]))
        else:
            mode = "train" if kwargs.get("kv_cache") is None else "cache"
            sizes = self._masked(module, mode, kwargs["chunk_partition"], height, width, clean is not None,
                                 x.device)
        self.calls.append(FARCall(x.shape[0], (frames, height, width), text.shape[1],
                                  out is not None and out.requires_grad, self.shared.active_adapter, *sizes,
                                  frames=frames + (0 if clean is None else clean.shape[1])))

    def _masked(self, model, mode, partition, height, width, has_clean, device) -> tuple[int, int, int, int]:
        """(tokens, compressed, outputs, allowed pairs) of a masked call, once per layout; the pairs from
        diffusers' mask evaluated at one token of each group (a chunk's compressed, noisy or clean tokens),
        within which it is constant."""
        key = far_masks.layout_of(model, mode=mode, chunk_partition=partition, height=height, width=width,
                                  has_clean=has_clean, device=device)
        if key not in self.layouts:
            limit = key.full_chunk_limit - (mode == "cache")
            n_comp = max(0, len(partition) - limit)
            full, comp = key.full_tokens[0] * key.full_tokens[1], key.compressed_tokens[0] * key.compressed_tokens[1]
            context, noisy = [k * comp for k in partition[:n_comp]], [k * full for k in partition[n_comp:]]
            sizes = torch.tensor(context + noisy * (2 if has_clean else 1))
            mask = far_masks.block_mask(model, mode=mode, chunk_partition=partition, height=height, width=width,
                                        has_clean=has_clean, device=device)
            starts = (sizes.cumsum(0) - sizes).to(mask.kv_num_blocks.device)
            zero = torch.zeros((), dtype=torch.long, device=starts.device)
            allowed = mask.mask_mod(zero, zero, starts[:, None], starts[None, :]).cpu()
            self.layouts[key] = (int(sizes.sum()), sum(context), 0 if mode == "cache" else sum(noisy),
                                 int((sizes[:, None] * sizes[None, :] * allowed).sum()))
        return self.layouts[key]

    def call_flops(self, call: FARCall) -> float:
        rank = self.shared.adapters[call.adapter].rank if call.adapter else 0
        return call.batch * far_forward_flops(self.cfg, call, self.lora.get(call.adapter, ()), rank)


def far_forward_flops(cfg: dict[str, Any], call: FARCall, lora: Sequence[tuple[int, int, bool]] = (),
                      rank: int = 0) -> float:
    """:func:`forward_flops`'s formula for one sample of a FAR call of N = ``call.tokens`` tokens (C of them
    compressed, O projected out) whose self-attention scores ``call.pairs`` query-key pairs P (the mask's
    allowed ones: a block-sparse kernel skips the others), with F = ``call.frames`` time embeddings::

        linear    = 2 N l (6 d^2 + 2 d f) + 2 c d [k (N - C) + k_c C] + 2 c k d O    blocks, patch embeddings,
                    + (the text and per-frame time terms of forward_flops)           proj_out
        attention = l (4 P d + 4 N L d)
    """
    pt, ph, pw = cfg["patch_size"]
    k, k_c = pt * ph * pw, pt * ph * pw * 4             # the compressed patch: H and W doubled
    d, f, layers = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    c = cfg["in_channels"]
    n, text_len, frames = call.tokens, call.text_len, call.frames
    linear = (2 * n * layers * (6 * d * d + 2 * d * f) + 2 * c * d * (k * (n - call.compressed) + k_c * call.compressed)
              + 2 * c * k * d * call.outputs
              + 2 * text_len * (layers * 2 * d * d + cfg["text_dim"] * d + d * d)
              + 2 * frames * (2 * (cfg["freq_dim"] * d + d * d) + 6 * d * d))
    attention = layers * (4 * call.pairs * d + 4 * n * text_len * d)
    return float(linear + attention + sum(2 * (n if per_token else frames) * rank * (i + o)
                                          for i, o, per_token in lora))


def causal(b: Bench) -> None:
    """The causal (FAR) student's Stage 1 (teacher forcing: K chunks drawn as in training, the official
    long-context ratio 0.5, a bidirectional loss with probability 0.1) and Stage 2 (chunk-by-chunk KV-cache
    self-rollout, each chunk on the fixed --plan; critic and teacher bidirectional on the same base), each on
    its own base, freed after."""
    for name, roles in (("stage1", ("student",)), ("stage2", ("student", "critic"))):
        if f"causal-{name}" in b.args.skip:
            continue
        shared = far_shared(b, roles)
        counter = FARCounter(shared, b.cfg)
        label = f"causal Stage {name[-1]}"
        report_steps(b, label, *b.fallback(label, lambda size, n=name, s=shared, c=counter: causal_steps(
            b, n, s, c, size), shared))
        counter.remove()
        del shared, counter
        free_memory(None, b.device)


def causal_steps(b: Bench, name: str, shared: SharedBase, counter: FARCounter, size: VideoSize) -> dict[str, Any]:
    """Timed steps of kind ``name`` on the FAR base at ``size`` (its chunk partition: :func:`far_partition`)."""
    shared.base.register_to_config(chunk_partition=far_partition(size.latent[0]))
    if name == "stage1":
        method = make_method("stage1", {"student": shared.role("student")}, b.world(size), b.args.batch)
    else:
        section = with_section("stage2", "stage2", rollout_steps=(b.args.plan.n,), dmd_batch_size=b.dmd_batch,
                               real_guidance=3.0)
        views = {r: shared.role(r) for r in ("student", "critic", "teacher")}
        method = pin_plan(make_method("stage2", views, b.world(size), b.stage2_batch, stage2=section), b.args.plan)
    return time_steps(method, name, counter, b.device, b.args.warmup, b.args.repeats)


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(WAN_CONFIGS), default="1.3b", help="model config (default 1.3b)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--base-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="dtype of the frozen base weights (LoRA, optimizer and EMA stay fp32)")
    ap.add_argument("--rank", type=int, default=256, help="LoRA rank = alpha (official 256)")
    ap.add_argument("--batch", type=int, default=1, help="samples per Stage-1 step and per timed forward")
    ap.add_argument("--dmd-batch", type=int, default=None, help="Stage-2 rollouts per step (1.3B: 2, 14B: 1)")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens (Wan: 512)")
    ap.add_argument("--sizes", default=None,
                    help="comma-separated FRAMESxHEIGHTxWIDTH, largest first (default 81x480x832 down to "
                         "17x240x416; tiny: 9x32x32)")
    ap.add_argument("--plan", default="4,1", help="Stage-2 rollout plan N,K (fixed for timing; default 4,1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls/steps")
    ap.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 in one process (train.parallel=fsdp)")
    ap.add_argument("--causal", action="store_true",
                    help="also the causal (FAR) student's Stage-1 and Stage-2 steps (parts causal-stage1, "
                         "causal-stage2)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: forward, stage1, stage2, "
                                               "causal-stage1, causal-stage2")
    ap.add_argument("--lever", action="append", default=[], metavar="KEY=VALUE",
                    help="a speed lever, named by its training config key (repeatable): "
                         + ", ".join(f"{k}={v}" for k, (_, v) in LEVERS.items()))
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after the timed steps, profile one Stage-1 and one Stage-2 step (torch.profiler): "
                         "DIR/profile.json, profile.md (time per phase and operator class), Chrome traces")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return _checked(ap, ap.parse_args(argv))


def _checked(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Validate the arguments and parse --plan, --sizes and --skip."""
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.rank < 1:
        ap.error("--repeats, --batch and --rank must be >= 1, --warmup >= 0")
    try:
        n, k = (int(v) for v in args.plan.split(","))
        args.plan = RolloutPlan(n, k)
    except ValueError as err:
        ap.error(f"--plan must be N,K with 0 <= K < N: {err}")
    args.sizes = [VideoSize.parse(s) for s in (args.sizes.split(",") if args.sizes else DEFAULT_SIZES[args.size])]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    try:
        args.levers = parse_levers(args.lever, not args.no_checkpointing)
    except ValueError as err:
        ap.error(str(err))
    if args.skip - {"forward", "stage1", "stage2", "causal-stage1", "causal-stage2"}:
        ap.error(f"--skip takes forward, stage1, stage2, causal-stage1, causal-stage2; got {sorted(args.skip)}")
    if args.causal and args.fsdp:
        ap.error("--causal times the unsharded causal steps; run it without --fsdp")
    if "model.causal.flex_compile" in args.levers and not args.causal:
        ap.error("--lever model.causal.flex_compile acts on the causal rows: add --causal")
    return args


# The speed levers this benchmark can pull, by their training config keys: (parser, example value). Each is
# applied by the library code a training run uses (anystep.build's levers, the kind's OptimConfig).
LEVERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "train.attention_backend": (str, "_native_flash"),
    "train.compile": (str, "blocks"),
    "optim.fused": (lambda v: {"true": True, "false": False}[v.lower()], "true"),
    "train.checkpoint_fraction": (float, "0.5"),
    "train.checkpoint_save": (str, "attention"),
    "model.causal.flex_compile": (lambda v: {"true": True, "false": False}[v.lower()], "false"),   # --causal
}


def parse_levers(items: Sequence[str], checkpointing: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` lever settings, checked the way a run's config checks them (``TrainConfig``, with
    gradient checkpointing as ``checkpointing``)."""
    from anystep.train.loop import TrainConfig

    levers: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in LEVERS:
            raise ValueError(f"--lever takes KEY=VALUE with KEY one of {list(LEVERS)}; got {item!r}")
        try:
            levers[key] = LEVERS[key][0](value)
        except (KeyError, ValueError) as err:
            raise ValueError(f"--lever {item}: not a value for {key} (e.g. {LEVERS[key][1]})") from err
    TrainConfig(gradient_checkpointing=checkpointing, **train_levers(levers))   # validates
    return levers


def train_levers(levers: dict[str, Any]) -> dict[str, Any]:
    """The ``train.*`` levers as ``TrainConfig`` fields."""
    return {k.split(".", 1)[1]: v for k, v in levers.items() if k.startswith("train.")}


def lever_label(levers: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in levers.items()) or "no levers"


@dataclass
class Bench:
    """One run's settings and the rows it has measured."""

    args: argparse.Namespace
    cfg: dict[str, Any]              # the Wan transformer config
    wan_params: int
    device: torch.device
    rows: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)   # --profile: a breakdown per step kind

    def __post_init__(self):
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.args.base_dtype]
        self.patch = self.cfg["patch_size"]
        self.dmd_batch = self.args.dmd_batch or DMD_BATCH[self.args.size]
        self.stage2_batch = max(self.args.batch, self.dmd_batch)
        self.peak = peak_tflops(self.device, self.args.peak_tflops)
        self.device_name = device_name(self.device)
        self.checkpointing = not self.args.no_checkpointing

    def add(self, size: VideoSize | None, metric: str, value: float | None) -> None:
        self.rows.append({"device": self.device_name, "size": size.label(self.patch) if size else "did not fit",
                          "metric": metric, "value": value})

    def mfu(self, flops: float, seconds: float) -> float | None:
        return None if self.peak is None else 100.0 * flops / seconds / (self.peak * 1e12)

    def world(self, size: VideoSize):
        """Random latents of ``size`` and text embeddings, on the device through anystep's ``OnDevice``."""
        f, h, w = size.latent
        return random_world((f, self.cfg["in_channels"], h, w), self.args.text_len, self.cfg["text_dim"], self.device)

    def shared(self, roles: Sequence[str]) -> SharedBase:
        train = train_levers(self.args.levers)
        shared = build_shared(self.cfg, self.device, self.dtype, self.args.rank, roles, self.checkpointing,
                              train.get("checkpoint_fraction", 1.0), train.get("checkpoint_save", "none"))
        if self.args.fsdp:   # every role's view over the one base, sharded as a training run shards it
            views = {name: shared.role(name) for name in (*roles, "teacher")}
            sharding.shard_roles(views, Processes(), self.device, bf16=True)
            if not sharding.sharded(shared.parameters()):
                raise RuntimeError("--fsdp: the base was not sharded")
        self.pull_levers(shared, roles)
        return shared

    def pull_levers(self, shared: SharedBase, roles: Sequence[str]) -> None:
        """The ``train.*`` levers on the base, checked and pulled by the functions a training run's builder
        calls (checkpointing levers: in :func:`build_shared`)."""
        from anystep.build import _check_checkpoint_levers, _speed_levers
        from anystep.train.loop import TrainConfig

        train = train_levers(self.args.levers)
        if train:
            views = {name: shared.role(name) for name in (*roles, "teacher")}
            config = TrainConfig(gradient_checkpointing=self.checkpointing, **train)
            _check_checkpoint_levers(views, config)
            _speed_levers(views, config, self.args.fsdp)

    @property
    def optim(self) -> dict[str, Any]:
        """Changes to every role's ``OptimConfig`` (``optim.*`` levers)."""
        return {k.split(".", 1)[1]: v for k, v in self.args.levers.items() if k.startswith("optim.")}

    def profiler(self, name: str, shared: SharedBase) -> Callable[[Any], dict[str, Any]] | None:
        """``--profile``: one step of ``name`` profiled (see step_profile.py), its trace in the profile folder."""
        if not self.args.profile:
            return None
        trace = Path(self.args.profile) / f"{name.lower().replace(' ', '_')}_trace.json"
        return lambda trainer: step_profile.profile_step(trainer, shared.base, list(shared.base.blocks),
                                                         self.device, trace)

    def label(self, name: str) -> str:
        return f"{name} (FSDP2, 1 process)" if self.args.fsdp else name

    def fallback(self, name: str, run: Callable[[VideoSize], dict[str, Any]], shared: SharedBase):
        return with_fallback(name, self.args.sizes, run, shared, self.device, self.patch)


def setup(argv: Sequence[str] | None) -> Bench:
    args = parse_args(argv)
    torch.manual_seed(0)
    wan = wan_on_meta(WAN_CONFIGS[args.size])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Bench(args, dict(wan.config), sum(p.numel() for p in wan.parameters()), device)


def print_header(b: Bench) -> None:
    a = b.args
    print(f"Wan2.1 {a.size} config ({b.wan_params / 1e9:.3f}B params, random weights) as the AnyFlow base on "
          f"{b.device_name}; base {a.base_dtype}, LoRA r = alpha = {a.rank} (fp32, AdamW, EMA), "
          f"gradient checkpointing {'on' if b.checkpointing else 'off'}, bf16 autocast, text {a.text_len} "
          f"tokens; forward/Stage-1 batch {a.batch}, Stage-2 data batch {b.stage2_batch} with DMD batch "
          f"{b.dmd_batch}, rollout plan fixed at N={a.plan.n}, k={a.plan.k}; "
          f"{'FSDP2-sharded in one process; ' if a.fsdp else ''}levers: {lever_label(a.levers)}; peak "
          f"{'n/a' if b.peak is None else f'{b.peak:g} TFLOP/s bf16 dense'}", flush=True)


def measure_forwards(b: Bench, shared: SharedBase, counter: ForwardCounter) -> None:
    """A no-grad forward of the student (with its adapter) and of the teacher (the bare base)."""
    for role in ("student", "teacher"):
        def run(size: VideoSize, role=role) -> dict[str, Any]:
            counter.reset()
            times = time_forward(shared.role(role), size, b.cfg, b.args.batch, b.args.text_len, b.device,
                                 b.args.warmup, b.args.repeats)
            return {"seconds": statistics.median(times), "flops": counter.call_flops(counter.calls[-1])}
        size, res = b.fallback(f"forward {role}", run, shared)
        b.add(size, b.label(f"forward {role}, no grad (s)"), res.get("seconds"))
        b.add(size, b.label(f"forward {role} (TFLOP)"), res["flops"] / 1e12 if res else None)
        b.add(size, b.label(f"forward {role} MFU (%)"), b.mfu(res["flops"], res["seconds"]) if res else None)


def report_steps(b: Bench, name: str, size: VideoSize | None, res: dict[str, Any]) -> None:
    if res.get("profile"):
        b.profiles[name] = res["profile"]
        print(step_profile.format_table(res["profile"], f"profile of one {name} step"), flush=True)
    b.add(size, f"{name} step (s)", statistics.median(res["times"]) if res else None)
    b.add(size, f"{name} peak memory (GiB)", res.get("peak_gib"))
    b.add(size, f"{name} sample-forwards/step (backward = 3)", res.get("equivalents"))
    b.add(size, f"{name} model TFLOP/step", res["flops"] / len(res["times"]) / 1e12 if res else None)
    b.add(size, f"{name} MFU (%)", b.mfu(res["flops"], sum(res["times"])) if res else None)
    for key, value in (res.get("first_losses") or {}).items():   # same seed and batch: equal across levers
        b.add(size, f"{name} first-step {key}", value)


def measure_stage1(b: Bench, shared: SharedBase, counter: ForwardCounter) -> None:
    """The stage1 kind's method (official Stage1Config) on the student adapter."""
    def run(size: VideoSize) -> dict[str, Any]:
        method = make_method("stage1", {"student": shared.role("student")}, b.world(size), b.args.batch)
        return time_steps(method, "stage1", counter, b.device, b.args.warmup, b.args.repeats, b.optim,
                          b.profiler("Stage 1", shared))
    report_steps(b, b.label("Stage 1"), *b.fallback("Stage 1", run, shared))


def forward_and_stage1(b: Bench) -> None:
    """A base with the student adapter, as a Stage-1 run builds it: the forwards, then Stage-1 steps (the base
    is freed when this returns)."""
    shared = b.shared(("student",))
    n_lora = sum(p.numel() for p in shared.adapters["student"].params.values())
    print(f"student adapter: {n_lora / 1e6:.1f}M params", flush=True)
    counter = ForwardCounter(shared, b.cfg)
    if "forward" not in b.args.skip:
        measure_forwards(b, shared, counter)
    if "stage1" not in b.args.skip:
        measure_stage1(b, shared, counter)
    counter.remove()


def stage2(b: Bench) -> None:
    """The stage2 kind's method (official Stage2Config, DMD batch per size), student and critic adapters, the
    teacher the bare base, every rollout on the fixed --plan."""
    shared = b.shared(("student", "critic"))
    counter = ForwardCounter(shared, b.cfg)

    def run(size: VideoSize) -> dict[str, Any]:
        section = with_section("stage2", "stage2", rollout_steps=(b.args.plan.n,), dmd_batch_size=b.dmd_batch,
                               real_guidance=3.0)
        roles = {name: shared.role(name) for name in ("student", "critic", "teacher")}
        method = pin_plan(make_method("stage2", roles, b.world(size), b.stage2_batch, stage2=section), b.args.plan)
        return time_steps(method, "stage2", counter, b.device, b.args.warmup, b.args.repeats, b.optim,
                          b.profiler("Stage 2", shared))
    report_steps(b, b.label("Stage 2"), *b.fallback("Stage 2", run, shared))
    counter.remove()


def write_json(b: Bench) -> None:
    a = b.args
    meta = {"model": a.size, "wan_params": b.wan_params, "base_dtype": a.base_dtype, "rank": a.rank,
            "batch": a.batch, "stage2_batch": b.stage2_batch, "dmd_batch": b.dmd_batch, "text_len": a.text_len,
            "plan": [a.plan.n, a.plan.k], "checkpointing": b.checkpointing, "peak_tflops": b.peak,
            "repeats": a.repeats, "warmup": a.warmup, "levers": a.levers}
    with open(a.json, "w") as f:
        json.dump({"config": meta, "rows": b.rows}, f, indent=2)
    print(f"wrote {a.json}")


@contextlib.contextmanager
def one_process_group(device: torch.device, wanted: bool):
    """A process group of one (FSDP2 needs one), left again at the end when this made it."""
    import torch.distributed as dist

    made = wanted and not dist.is_initialized()
    if made:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        if made:
            dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints the table and returns its rows (dicts: device, size, metric, value)."""
    b = setup(argv)
    with one_process_group(b.device, b.args.fsdp):
        return _run(b)


def _run(b: Bench) -> list[dict[str, Any]]:
    print_header(b)
    forward_and_stage1(b)
    free_memory(None, b.device)        # the Stage-1 base is gone before the Stage-2 base is built
    if "stage2" not in b.args.skip:
        stage2(b)
        free_memory(None, b.device)
    if b.args.causal:
        causal(b)
    print_table(b.rows)
    if b.profiles:
        print(f"profile: {step_profile.write(b.profiles, Path(b.args.profile))}")
    if b.args.json:
        write_json(b)
    return b.rows


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric.endswith("(s)"):
        return f"{value:.4g}"
    if "forwards" in metric:
        return f"{value:g}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| device | size | metric | value |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['size']} | {r['metric']} | {_fmt(r['metric'], r['value'])} |")


if __name__ == "__main__":
    main()
