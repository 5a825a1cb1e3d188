"""The causal (FAR) AnyFlow student: diffusers' ``AnyFlowFARTransformer3DModel`` built from Wan weights, its
three forward modes behind :class:`CausalStudent` (the one implementation of
:class:`~anystep.causal.CausalFlowMap`), and the settings that build it (:class:`CausalModelConfig`).

The FAR model (official sec. 5) splits the latent video into chunks (``chunk_partition``, latent frames per
chunk, stored in the model's own config). The newest ``full_chunk_limit`` (3) chunks are patchified at full
resolution (patch 1x2x2), all older chunks as *compressed context* (patch 1x4x4 through
``far_patch_embedding``, 4x fewer tokens, RoPE frequencies average-pooled to the patch centres). Its causal
self-attention is :mod:`anystep.models.far_attention` (flex on CUDA, a dense mask on CPU); its KV cache is
:mod:`anystep.models.far_cache`.

Forward modes (all take the AnyFlow layout: ``(B, F, C, H, W)`` latents, timesteps in [0, 1000],
text ``(B, L, text_dim)``):

* :func:`teacher_forced`: the official teacher-forcing training forward, sequence
  ``[compressed clean context | noisy full chunks | clean copies of those chunks]``;
* :func:`bidirectional`: all frames as one chunk, full attention (the bidirectional teacher/critic and the
  optional bidirectional loss on the same weights);
* :class:`~anystep.models.far_cache.ChunkCache`: the KV-cache rollout, prefill the generated prefix then
  denoise the next chunk.

Equivalences (tested): ``bidirectional`` at r = t equals the Wan transformer and for r != t the bidirectional
``AnyFlowTransformer3DModel`` of :func:`~anystep.models.wan.student_from_wan`; the cached call for chunk c
equals the last noisy chunk of ``teacher_forced`` with the (ground-truth) prefix as context and clean copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, WanTransformer3DModel
from torch import nn

from ..causal import TeacherForcing, chunks_covering
from . import far_masks
from .architectures import CausalModelConfig
from .far_attention import set_causal_attention
from .far_cache import ChunkCache, per_frame

_SHARED_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim",
                "rope_max_seq_len")


# ---------------------------------------------------------------------------------------------- building
def far_student_from_wan(wan: WanTransformer3DModel | AnyFlowTransformer3DModel, *,
                         chunk_partition: Sequence[int], full_chunk_limit: int = 3,
                         compressed_patch_size: tuple[int, int, int] | None = None, gate_value: float = 0.25,
                         deltatime_type: str = "r", attention: str = "auto",
                         flex_compile: bool = True) -> AnyFlowFARTransformer3DModel:
    """An ``AnyFlowFARTransformer3DModel`` initialised from a Wan (or bidirectional AnyFlow) transformer.

    Every shared weight is copied (the state-dict keys are identical between the three classes); for a Wan
    source ``condition_embedder.delta_embedder`` is a copy of the time embedder (an AnyFlow source brings its
    own). ``far_patch_embedding`` is the copied patch kernel trilinearly interpolated from ``patch_size`` to
    ``compressed_patch_size`` with the bias copied (official ``setup_far_model``; diffusers' constructor does
    this from its random init, so it is redone here after loading). ``compressed_patch_size`` defaults to the
    patch size with height and width doubled. ``chunk_partition`` is stored in the config (the pipeline's
    default). ``gate_value``/``deltatime_type`` are used as given, also for an AnyFlow source. The causal
    blocks get :func:`set_causal_attention` with ``attention`` ("auto": dense on CPU, flex on CUDA) and
    ``flex_compile`` (flex through ``torch.compile``).
    Raises on a Wan variant the FAR class cannot hold and on any state-dict key that does not map.
    """
    cfg = wan.config
    if isinstance(wan, WanTransformer3DModel):
        if cfg.qk_norm != "rms_norm_across_heads" or cfg.added_kv_proj_dim is not None:
            raise ValueError("AnyFlowFARTransformer3DModel holds Wan transformers with qk_norm="
                             f"'rms_norm_across_heads' and no added_kv_proj_dim; got "
                             f"qk_norm={cfg.qk_norm!r}, added_kv_proj_dim={cfg.added_kv_proj_dim!r}")
    elif not isinstance(wan, AnyFlowTransformer3DModel):
        raise TypeError(f"expected a WanTransformer3DModel or AnyFlowTransformer3DModel, "
                        f"got {type(wan).__name__}")
    patch = tuple(cfg.patch_size)
    compressed = tuple(compressed_patch_size or (patch[0], 2 * patch[1], 2 * patch[2]))
    far = AnyFlowFARTransformer3DModel(**{k: cfg[k] for k in _SHARED_KEYS}, compressed_patch_size=compressed,
                                       full_chunk_limit=full_chunk_limit, gate_value=gate_value,
                                       deltatime_type=deltatime_type, chunk_partition=tuple(chunk_partition))
    state = {k: v.detach().clone() for k, v in wan.state_dict().items()}
    time, delta = "condition_embedder.time_embedder.", "condition_embedder.delta_embedder."
    if isinstance(wan, WanTransformer3DModel):
        for key in [k for k in state if k.startswith(time)]:
            state[delta + key[len(time):]] = state[key].clone()
    state.update(_far_patch_embedding(state["patch_embedding.weight"], state["patch_embedding.bias"],
                                      compressed))
    expected = set(far.state_dict())
    if set(state) != expected:
        raise KeyError(f"state-dict keys do not map onto AnyFlowFARTransformer3DModel: unmapped source keys "
                       f"{sorted(set(state) - expected)}, missing FAR keys {sorted(expected - set(state))}")
    far.load_state_dict(state, strict=True, assign=True)
    set_causal_attention(far, attention, flex_compile)
    return far.train(wan.training)


def causal_student_network(source: WanTransformer3DModel | AnyFlowTransformer3DModel | AnyFlowFARTransformer3DModel,
                           cfg: CausalModelConfig, gate_value: float = 0.25,
                           deltatime_type: str = "r") -> AnyFlowFARTransformer3DModel:
    """The FAR transformer of a causal student: built from a bidirectional ``source`` with
    :func:`far_student_from_wan`, or ``source`` itself when it is already a FAR model (a released causal AnyFlow
    model imported to train on), whose own layout must then be the one asked for."""
    if not isinstance(source, AnyFlowFARTransformer3DModel):
        return far_student_from_wan(source, chunk_partition=cfg.chunk_partition, full_chunk_limit=cfg.full_chunk_limit,
                                    compressed_patch_size=cfg.compressed_patch_size, gate_value=gate_value,
                                    deltatime_type=deltatime_type, attention=cfg.attention,
                                    flex_compile=cfg.compiled_flex)
    own = source.config
    wanted = {"chunk_partition": tuple(cfg.chunk_partition), "full_chunk_limit": cfg.full_chunk_limit,
              "gate_value": gate_value, "deltatime_type": deltatime_type}
    if cfg.compressed_patch_size is not None:
        wanted["compressed_patch_size"] = tuple(cfg.compressed_patch_size)
    for key, value in wanted.items():
        theirs = tuple(own[key]) if isinstance(own[key], (list, tuple)) else own[key]
        if theirs != value:
            raise ValueError(f"the causal base has {key}={theirs!r}, but {value!r} was asked for: set it to the "
                             "base's")
    set_causal_attention(source, cfg.attention, cfg.compiled_flex)
    return source


def _far_patch_embedding(weight: torch.Tensor, bias: torch.Tensor,
                         compressed: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The compressed patch kernel: the full kernel trilinearly interpolated to ``compressed``, same bias."""
    out_ch, in_ch, *patch = weight.shape
    kernel = F.interpolate(weight.float().reshape(-1, 1, *patch), size=compressed, mode="trilinear",
                           align_corners=False)
    return {"far_patch_embedding.weight": kernel.reshape(out_ch, in_ch, *compressed).to(weight.dtype),
            "far_patch_embedding.bias": bias.clone()}


# ---------------------------------------------------------------------------------------------- forward modes
def split_chunks(model: AnyFlowFARTransformer3DModel, chunk_partition: Sequence[int]) -> tuple[int, int]:
    """(compressed, full) chunk counts of a teacher-forced/training sequence: the newest ``full_chunk_limit``
    chunks are full resolution (noisy, with clean copies), all older ones compressed clean context."""
    limit = model.config.full_chunk_limit
    full = min(len(chunk_partition), limit)
    return len(chunk_partition) - full, full


def teacher_forced(model: AnyFlowFARTransformer3DModel, noisy: torch.Tensor, t: torch.Tensor | float,
                   r: torch.Tensor | float, text: torch.Tensor, *, clean: torch.Tensor,
                   context: torch.Tensor | None = None, chunk_partition: Sequence[int]) -> torch.Tensor:
    """The official teacher-forcing forward; returns the flow-map output u for the noisy frames,
    (B, Fn, C, H, W).

    Args:
        noisy: (B, Fn, C, H, W) the noisy full-resolution chunks (the newest ``min(K, full_chunk_limit)``
            chunks of ``chunk_partition``), all at the sample's (t, r).
        t, r: (B,) (or scalars) timesteps in [0, 1000], one per sample, applied to every noisy frame.
        text: (B, L, text_dim).
        clean: (B', Fn, C, H, W) the clean (ground-truth) versions of ``noisy``: the clean copies (t = r = 0).
            A noisy chunk attends to the clean copies of the strictly earlier full chunks, to the context and
            to itself (never to other noisy chunks).
        context: (B', Fc, C, H, W) clean compressed context frames (the older chunks, t = r = 0), or None
            when ``chunk_partition`` has at most ``full_chunk_limit`` chunks.
        chunk_partition: frames per chunk of [context | noisy], sum = Fc + Fn; the split between context and
            noisy chunks is the model's (``split_chunks``), and must match the given frame counts.

    B may be k * B' (conditional and unconditional calls batched together): ``clean`` and ``context`` are
    then repeated as ``torch.cat([x] * k)`` (block order, matching a caller's ``torch.cat([a, b])``).
    Runs under autograd (dense attention on CPU). The attention mask is built once per layout
    (:func:`~anystep.models.far_masks.block_mask`).

    In diffusers' terms: ``hidden_states`` = [context | noisy] (B, Fc + Fn, ...), ``timestep`` and
    ``r_timestep`` (B, Fc + Fn) = 0 on the context frames and t resp. r on the noisy ones,
    ``clean_hidden_states`` = the clean copies (B, Fn, ...), ``clean_timestep`` = zeros (B, Fn) (it is both
    t and r of the copies). The output of the *last* noisy chunk equals a :class:`ChunkCache` call with the
    clean prefix prefilled; an earlier noisy chunk sees the older chunks compressed where the rollout would
    hold the newest two of its own prefix at full resolution (the official train/rollout layout differs
    there once there are more than ``full_chunk_limit`` chunks).
    """
    batch, frames = noisy.shape[:2]
    n_comp, _ = split_chunks(model, chunk_partition)
    fc = sum(chunk_partition[:n_comp])
    given_fc = 0 if context is None else context.shape[1]
    if fc != given_fc or sum(chunk_partition) - fc != frames:
        raise ValueError(f"chunk_partition {list(chunk_partition)} with full_chunk_limit "
                         f"{model.config.full_chunk_limit} means {fc} compressed context frames and "
                         f"{sum(chunk_partition) - fc} noisy frames; got {given_fc} context and {frames} "
                         f"noisy")
    if clean.shape[1:] != noisy.shape[1:]:
        raise ValueError(f"clean {tuple(clean.shape)} must be the clean version of noisy "
                         f"{tuple(noisy.shape)}")
    clean = _repeat_batch(clean, batch)
    if context is not None:
        noisy_in = torch.cat([_repeat_batch(context, batch).to(noisy.dtype), noisy], 1)
    else:
        noisy_in = noisy
    zeros = torch.zeros(batch, fc, device=noisy.device)
    t_frames = torch.cat([zeros, per_frame(t, batch, frames, noisy.device)], 1)
    r_frames = torch.cat([zeros, per_frame(r, batch, frames, noisy.device)], 1)
    mask = far_masks.block_mask(model, mode="train", chunk_partition=chunk_partition, height=noisy.shape[3],
                                width=noisy.shape[4], has_clean=True, device=noisy.device)
    return model(hidden_states=noisy_in, timestep=t_frames, r_timestep=r_frames, encoder_hidden_states=text,
                 chunk_partition=list(chunk_partition), clean_hidden_states=clean.to(noisy.dtype),
                 clean_timestep=torch.zeros(batch, frames, device=noisy.device), attention_mask=mask,
                 return_dict=False)[0]


def bidirectional(model: AnyFlowFARTransformer3DModel, x: torch.Tensor, t: torch.Tensor | float,
                  r: torch.Tensor | float, text: torch.Tensor) -> torch.Tensor:
    """All F frames of ``x`` (B, F, C, H, W) as one chunk: full attention over the clip, no context, no clean
    copies (the official ``is_causal=False`` mode). t, r: (B,) or scalars; returns u (B, F, C, H, W)."""
    batch, frames = x.shape[:2]
    mask = far_masks.block_mask(model, mode="train", chunk_partition=[frames], height=x.shape[3],
                                width=x.shape[4], has_clean=False, device=x.device)
    return model(hidden_states=x, timestep=per_frame(t, batch, frames, x.device),
                 r_timestep=per_frame(r, batch, frames, x.device), encoder_hidden_states=text,
                 chunk_partition=[frames], attention_mask=mask, return_dict=False)[0]


class CausalStudent(nn.Module):
    """A FAR transformer as a causal flow map (:class:`~anystep.causal.CausalFlowMap`): called with a
    :class:`~anystep.causal.TeacherForcing` condition it runs :func:`teacher_forced`; :meth:`bidirectional` runs
    all frames as one chunk; :meth:`cache` gives a rollout's KV cache. Its chunk partition is the model's own
    (``config.chunk_partition``).

    ``active`` is a zero-argument callable returning a context manager that wraps every call: a LoRA role
    (:class:`~anystep.models.roles.CausalRoleView`) passes its shared base's adapter switch, so full fine-tunes and
    adapters share this one implementation."""

    def __init__(self, transformer: AnyFlowFARTransformer3DModel,
                 active: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        super().__init__()
        if not isinstance(transformer, AnyFlowFARTransformer3DModel):
            raise TypeError(f"a causal student is an AnyFlowFARTransformer3DModel, got {type(transformer).__name__}")
        self.transformer = transformer
        self._active = active

    @property
    def chunk_partition(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.transformer.config.chunk_partition)

    @property
    def full_chunk_limit(self) -> int:
        return self.transformer.config.full_chunk_limit

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: TeacherForcing) -> torch.Tensor:
        """Teacher forcing: u for the noisy chunks ``x`` (B, Fn, C, H, W) given the clip's context and copies."""
        if not isinstance(cond, TeacherForcing):
            raise TypeError(f"a causal student is called with a TeacherForcing condition (got "
                            f"{type(cond).__name__}); use .bidirectional(x, t, r, text) for full attention")
        partition = chunks_covering(self.chunk_partition, cond.frames)
        with self._active():
            return teacher_forced(self.transformer, x, t.to(x.device), r.to(x.device), cond.text,
                                  clean=cond.clean, context=cond.context, chunk_partition=partition)

    def bidirectional(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """All frames as one chunk (full attention): the same weights as a bidirectional flow map."""
        with self._active():
            return bidirectional(self.transformer, x, t.to(x.device), r.to(x.device), text)

    def cache(self) -> ChunkCache:
        """A fresh KV cache for a chunk-by-chunk rollout (its calls run under ``active`` too)."""
        return ChunkCache(self.transformer, active=self._active)


def _repeat_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` (B', ...) repeated in block order to batch B = k * B'."""
    if batch % x.shape[0]:
        raise ValueError(f"batch {batch} is not a multiple of the context/clean batch {x.shape[0]}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1))) if batch != x.shape[0] else x
