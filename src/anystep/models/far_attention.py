"""Causal self-attention of the FAR model that runs everywhere: diffusers' flex-attention ``BlockMask`` through
a compiled flex kernel where flex runs (CUDA), made dense for SDPA where it cannot (no flex backward on CPU), and
an unpadded read of the KV cache.

:func:`set_causal_attention` installs it on a model; :func:`patch_far_pipeline` on a diffusers
``AnyFlowFARPipeline`` (whose stock processor pads the cache read without a mask in diffusers 0.42.1).

Compiled flex: ``flex_attention`` called eagerly (what diffusers' ``AnyFlowCausalAttnProcessor`` does, through
``dispatch_attention_fn``) runs an unfused reference implementation that materialises the whole (L, L) score
matrix, slow or out of memory at the official 32,760-token clips (65,520 with the clean copies). The official
AnyFlow code calls a ``torch.compile``-d ``flex_attention`` (dynamic shapes) there. Here
:func:`compiled_flex_attention` is ``torch.compile(flex_attention, dynamic=False)``, made once per process: one
fused kernel per sequence length (a run meets a few dozen: K chunks x train / prefill x batch), each compiled
on first use, with dynamo's recompile limit raised for this function only (:data:`FLEX_RECOMPILE_LIMIT`) so no
layout falls back to the unfused path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AnyFlowFARTransformer3DModel
from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor, apply_rotary_emb
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from . import far_masks
from .far_masks import dense_mask

BACKENDS = ("auto", "dense", "flex", "diffusers")
FLEX_RECOMPILE_LIMIT = 256        # sequence lengths the compiled flex kernel may be specialised to
_compiled_flex: Callable[..., torch.Tensor] | None = None

__all__ = ["BACKENDS", "FARAttnProcessor", "compiled_flex_attention", "dense_mask", "patch_far_pipeline",
           "set_causal_attention"]


def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention, dynamic=False)``, created on first use and shared by the process."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FARAttnProcessor:
    """Drop-in for diffusers' ``AnyFlowCausalAttnProcessor`` (same call signature and KV-cache protocol).

    * Masked calls (the train path and the KV-cache prefill, which pass a ``BlockMask``): ``backend="flex"``
      runs flex attention with the mask, ``"dense"`` SDPA on the unpadded sequence with :func:`dense_mask`;
      ``"auto"`` picks flex on CUDA and dense elsewhere (flex has no CPU backward). Flex runs
      :func:`compiled_flex_attention` with ``flex_compile`` (default), else diffusers' own processor (eager
      flex_attention through ``dispatch_attention_fn``); both pad the sequence to a multiple of 128 (the
      mask's block size) and a head dim under 16 to 16 (flex's minimum, with the original head dim's scale).
    * Mask-less calls (the KV-cache read while denoising a chunk) and calls with a mask that masks nothing
      (:func:`far_masks.allows_all`: the bidirectional mode): plain SDPA over [cache | chunk], whatever
      the backend. This is the official semantics; diffusers' flex processor pads query *and* key to a
      multiple of 128 there without a mask, so its zero key padding takes part in the softmax (measured on a
      tiny model, chunks of 16-32 tokens: max abs error 0.1-0.3 on outputs of magnitude ~2).

    One instance is shared by all blocks. The dense mask of a ``BlockMask`` from :mod:`far_masks` is made
    once per layout and kept there; of any other mask, once per forward (kept until the next mask).
    """

    def __init__(self, backend: str = "auto", flex_compile: bool = True):
        if backend not in ("auto", "dense", "flex"):
            raise ValueError(f"backend must be 'auto', 'dense' or 'flex', got {backend!r}")
        self.backend, self.flex_compile = backend, flex_compile
        self._flex = AnyFlowCausalAttnProcessor()
        self._mask_source: BlockMask | None = None
        self.mask: torch.Tensor | None = None   # the dense mask of the last dense masked call

    def uses_flex(self, device: torch.device) -> bool:
        return self.backend == "flex" or (self.backend == "auto" and device.type == "cuda")

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: BlockMask | None = None,
                 rotary_emb: dict[str, torch.Tensor] | None = None,
                 kv_cache: dict[str, torch.Tensor] | None = None,
                 kv_cache_flag: dict[str, Any] | None = None) -> torch.Tensor:
        if attention_mask is not None and far_masks.allows_all(attention_mask):
            attention_mask = None      # the bidirectional mode: plain SDPA, as the official code
        flex = attention_mask is not None and self.uses_flex(hidden_states.device)
        if flex and not self.flex_compile:
            return self._flex(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                              kv_cache, kv_cache_flag)
        query, key, value = _project(attn, hidden_states, encoder_hidden_states, rotary_emb, kv_cache,
                                     kv_cache_flag)
        if flex:
            out = padded_flex_attention(query, key, value, attention_mask)
        else:
            mask = None if attention_mask is None else self._dense(attention_mask, query.shape[2])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _dense(self, block_mask: BlockMask, length: int) -> torch.Tensor:
        kept = far_masks.dense_mask_of(block_mask, length)
        if kept is not None:
            self.mask, self._mask_source = kept, block_mask
        elif block_mask is not self._mask_source or self.mask is None or self.mask.shape[0] != length:
            self.mask, self._mask_source = dense_mask(block_mask, length), block_mask
        return self.mask


def padded_flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          block_mask: BlockMask) -> torch.Tensor:
    """Compiled flex attention of (B, heads, L, D) q, k, v under a FAR ``BlockMask`` (padded to a multiple of
    128 tokens): the sequence zero-padded to the mask's length and a head dim under 16 zero-padded to 16
    (scale 1/sqrt(D) kept), both cut off again; the steps of diffusers' ``AnyFlowCausalAttnProcessor``."""
    length, head_dim = query.shape[2], query.shape[3]
    seq_pad = math.ceil(length / 128) * 128 - length
    head_pad = max(0, 16 - head_dim)
    if seq_pad or head_pad:
        query, key, value = (F.pad(x, (0, head_pad, 0, seq_pad)) for x in (query, key, value))
    scale = 1.0 / math.sqrt(head_dim) if head_pad else None
    if torch.compiler.is_compiling():    # inside a compiled region (train.compile=blocks): traced into it
        out = flex_attention(query, key, value, block_mask=block_mask, scale=scale)
    else:
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            out = compiled_flex_attention()(query, key, value, block_mask=block_mask, scale=scale)
    return out[:, :, :length, :head_dim]


def _project(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             rotary_emb: dict[str, torch.Tensor] | None, kv_cache: dict[str, torch.Tensor] | None,
             kv_cache_flag: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, heads, L, head_dim) with the KV cache written (prefill) or prepended (read) and RoPE
    applied: the steps of diffusers' ``AnyFlowCausalAttnProcessor`` before its attention call. The cache
    holds keys before RoPE; RoPE is applied to the concatenated keys."""
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    dtype = hidden_states.dtype
    query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query, key, value = (x.to(dtype).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                         for x in (query, key, value))
    if kv_cache is not None:
        full, compressed = kv_cache["full_cache"], kv_cache["compressed_cache"]
        if kv_cache_flag["is_cache_step"]:
            n_comp, n_full = kv_cache_flag["num_compressed_tokens"], kv_cache_flag["num_full_tokens"]
            for i, x in enumerate((key, value)):
                compressed[i, :, :, :n_comp] = x[:, :, :n_comp]
                full[i, :, :, :n_full] = x[:, :, n_comp:]
        else:
            n_comp = kv_cache_flag["num_cached_compressed_tokens"]
            n_full = kv_cache_flag["num_cached_full_tokens"]
            key, value = (torch.cat([compressed[i, :, :, :n_comp].to(x.dtype),
                                     full[i, :, :, :n_full].to(x.dtype), x], dim=2)
                          for i, x in enumerate((key, value)))
    if rotary_emb is not None:
        query = apply_rotary_emb(query, rotary_emb["query"])
        key = apply_rotary_emb(key, rotary_emb["key"])
    return query, key, value


def set_causal_attention(model: AnyFlowFARTransformer3DModel,
                         backend: str = "auto", flex_compile: bool = True) -> FARAttnProcessor | None:
    """Install the causal self-attention on every block of ``model``: one shared :class:`FARAttnProcessor`
    (``"auto"``: dense on CPU, flex on CUDA, decided per call from the device; ``"dense"``; ``"flex"``) or,
    with ``"diffusers"``, diffusers' own ``AnyFlowCausalAttnProcessor`` (eager flex only, also on the cache
    read). ``flex_compile``: flex calls run the compiled kernel (:func:`compiled_flex_attention`), else
    diffusers' eager one. Returns the installed :class:`FARAttnProcessor` (None for ``"diffusers"``).

    Processors are not saved with the weights: call this again after ``from_pretrained``. The dense path
    materialises an (L, L) boolean mask (L = tokens of the whole sequence): meant for CPU and small models."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    shared = FARAttnProcessor(backend, flex_compile) if backend != "diffusers" else None
    for block in model.blocks:
        if not block.is_causal:
            raise ValueError("set_causal_attention expects the causal blocks of an "
                             "AnyFlowFARTransformer3DModel")
        block.attn1.set_processor(shared if shared is not None else AnyFlowCausalAttnProcessor())
    return shared


def patch_far_pipeline(pipe, backend: str = "auto"):
    """Make a diffusers ``AnyFlowFARPipeline`` sample like the official code (and like
    :func:`anystep.causal.sample_causal`): install :class:`FARAttnProcessor` on its transformer's causal blocks.

    diffusers 0.42.1's ``AnyFlowCausalAttnProcessor`` pads queries and keys to a multiple of 128 tokens with
    zeros *without a mask* when it denoises a chunk against the KV cache, so the zero keys take part in the
    softmax unless the chunk happens to be a multiple of 128 tokens (never at 480x832: 1560 tokens per latent
    frame). The installed processor reads the cache with unpadded attention there, and keeps the masked calls
    (the cache prefill) on compiled flex with ``backend="auto"`` on CUDA (dense SDPA on CPU). Idempotent; returns
    ``pipe``. Raises ``TypeError`` for anything but an ``AnyFlowFARPipeline`` with an
    ``AnyFlowFARTransformer3DModel``.

        pipe = anystep.patch_far_pipeline(AnyFlowFARPipeline.from_pretrained(folder))
    """
    from diffusers import AnyFlowFARPipeline

    if backend not in ("auto", "dense", "flex"):
        raise ValueError(f"backend must be 'auto', 'dense' or 'flex', got {backend!r}")
    if not isinstance(pipe, AnyFlowFARPipeline):
        raise TypeError(f"patch_far_pipeline expects a diffusers AnyFlowFARPipeline, got {type(pipe).__name__} "
                        "(the bidirectional AnyFlowPipeline needs no patch)")
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, AnyFlowFARTransformer3DModel):
        raise TypeError(f"patch_far_pipeline: the pipeline's transformer is a {type(transformer).__name__}, not "
                        "an AnyFlowFARTransformer3DModel")
    processors = {id(block.attn1.processor): block.attn1.processor for block in transformer.blocks}
    installed = next(iter(processors.values())) if len(processors) == 1 else None
    if not (isinstance(installed, FARAttnProcessor) and installed.backend == backend):
        set_causal_attention(transformer, backend)
    return pipe
