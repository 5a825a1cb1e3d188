"""The causal (FAR) AnyFlow student: diffusers' ``AnyFlowFARTransformer3DModel`` built from Wan weights, an
attention path that trains on CPU, and three forward modes that hide diffusers' internals.

The FAR model (official sec. 5) splits the latent video into chunks (``chunk_partition``, latent frames per
chunk). The newest ``full_chunk_limit`` (3) chunks are patchified at full resolution (patch 1x2x2), all older
chunks as *compressed context* (patch 1x4x4 through ``far_patch_embedding``, 4x fewer tokens, RoPE frequencies
average-pooled to the patch centres). Its causal self-attention runs on diffusers' flex-attention
``BlockMask``; flex has no backward on CPU, so :class:`FARAttnProcessor` computes the same attention with SDPA
and a dense mask (materialised from the same ``BlockMask``) where flex cannot run.

Forward modes (all take the AnyFlow layout: ``(B, F, C, H, W)`` latents, timesteps in [0, 1000],
text ``(B, L, text_dim)``):

* :func:`teacher_forced`: the official teacher-forcing training forward, sequence
  ``[compressed clean context | noisy full chunks | clean copies of those chunks]``;
* :func:`bidirectional`: all frames as one chunk, full attention (the bidirectional teacher/critic and the
  optional bidirectional loss on the same weights);
* :class:`ChunkCache`: the KV-cache rollout, prefill the generated prefix then denoise the next chunk.

Equivalences (tested): ``bidirectional`` at r = t equals the Wan transformer and for r != t the bidirectional
``AnyFlowTransformer3DModel`` of :func:`~anystep.models.wan.student_from_wan`; the cached call for chunk c
equals the last noisy chunk of ``teacher_forced`` with the (ground-truth) prefix as context and clean copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, WanTransformer3DModel
from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor, apply_rotary_emb
from torch.nn.attention.flex_attention import BlockMask

_SHARED_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim",
                "rope_max_seq_len")
BACKENDS = ("auto", "dense", "flex", "diffusers")


# ---------------------------------------------------------------------------------------------- building
def far_student_from_wan(wan: WanTransformer3DModel | AnyFlowTransformer3DModel, *,
                         chunk_partition: Sequence[int], full_chunk_limit: int = 3,
                         compressed_patch_size: tuple[int, int, int] | None = None, gate_value: float = 0.25,
                         deltatime_type: str = "r", attention: str = "auto") -> AnyFlowFARTransformer3DModel:
    """An ``AnyFlowFARTransformer3DModel`` initialised from a Wan (or bidirectional AnyFlow) transformer.

    Every shared weight is copied (the state-dict keys are identical between the three classes); for a Wan
    source ``condition_embedder.delta_embedder`` is a copy of the time embedder (an AnyFlow source brings its
    own). ``far_patch_embedding`` is the copied patch kernel trilinearly interpolated from ``patch_size`` to
    ``compressed_patch_size`` with the bias copied (official ``setup_far_model``; diffusers' constructor does
    this from its random init, so it is redone here after loading). ``compressed_patch_size`` defaults to the
    patch size with height and width doubled. ``chunk_partition`` is stored in the config (the pipeline's
    default). ``gate_value``/``deltatime_type`` are used as given, also for an AnyFlow source. The causal
    blocks get :func:`set_causal_attention` with ``attention`` ("auto": dense on CPU, flex on CUDA).
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
    set_causal_attention(far, attention)
    return far.train(wan.training)


def _far_patch_embedding(weight: torch.Tensor, bias: torch.Tensor,
                         compressed: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The compressed patch kernel: the full kernel trilinearly interpolated to ``compressed``, same bias."""
    out_ch, in_ch, *patch = weight.shape
    kernel = F.interpolate(weight.float().reshape(-1, 1, *patch), size=compressed, mode="trilinear",
                           align_corners=False)
    return {"far_patch_embedding.weight": kernel.reshape(out_ch, in_ch, *compressed).to(weight.dtype),
            "far_patch_embedding.bias": bias.clone()}


# ---------------------------------------------------------------------------------------------- attention
def dense_mask(block_mask: BlockMask, length: int) -> torch.Tensor:
    """The boolean (length, length) mask of a FAR ``BlockMask`` (True = may attend), evaluated token by token
    from its ``mask_mod`` over the first ``length`` (unpadded) positions: exactly what flex applies there."""
    device = block_mask.kv_num_blocks.device
    idx = torch.arange(length, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return block_mask.mask_mod(zero, zero, idx[:, None], idx[None, :]).expand(length, length).bool()


class FARAttnProcessor:
    """Drop-in for diffusers' ``AnyFlowCausalAttnProcessor`` (same call signature and KV-cache protocol).

    * Masked calls (the train path and the KV-cache prefill, which pass a ``BlockMask``): ``backend="flex"``
      hands the call to diffusers' flex processor; ``"dense"`` runs SDPA on the unpadded sequence with
      :func:`dense_mask`; ``"auto"`` picks flex on CUDA and dense elsewhere (flex has no CPU backward).
    * Mask-less calls (the KV-cache read while denoising a chunk): plain SDPA over [cache | chunk], whatever
      the backend. This is the official semantics; diffusers' flex processor pads query *and* key to a
      multiple of 128 there without a mask, so its zero key padding takes part in the softmax (measured on a
      tiny model, chunks of 16-32 tokens: max abs error 0.1-0.3 on outputs of magnitude ~2).

    One instance is shared by all blocks (the dense mask is built once per forward and cached).
    """

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "dense", "flex"):
            raise ValueError(f"backend must be 'auto', 'dense' or 'flex', got {backend!r}")
        self.backend = backend
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
        if attention_mask is not None and self.uses_flex(hidden_states.device):
            return self._flex(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                              kv_cache, kv_cache_flag)
        query, key, value = _project(attn, hidden_states, encoder_hidden_states, rotary_emb, kv_cache,
                                     kv_cache_flag)
        mask = None if attention_mask is None else self._dense(attention_mask, query.shape[2])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _dense(self, block_mask: BlockMask, length: int) -> torch.Tensor:
        if block_mask is not self._mask_source or self.mask is None or self.mask.shape[0] != length:
            self.mask, self._mask_source = dense_mask(block_mask, length), block_mask
        return self.mask


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
                         backend: str = "auto") -> FARAttnProcessor | None:
    """Install the causal self-attention on every block of ``model``: one shared :class:`FARAttnProcessor`
    (``"auto"``: dense on CPU, flex on CUDA, decided per call from the device; ``"dense"``; ``"flex"``) or,
    with ``"diffusers"``, diffusers' own ``AnyFlowCausalAttnProcessor`` (flex only, also on the cache read).
    Returns the installed :class:`FARAttnProcessor` (None for ``"diffusers"``).

    Processors are not saved with the weights: call this again after ``from_pretrained``. The dense path
    materialises an (L, L) boolean mask (L = tokens of the whole sequence): meant for CPU and small models."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    shared = FARAttnProcessor(backend) if backend != "diffusers" else None
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
    (the cache prefill) on flex with ``backend="auto"`` on CUDA (dense SDPA on CPU). Idempotent; returns
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
    Runs under autograd (dense attention on CPU).

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
    t_frames = torch.cat([zeros, _per_frame(t, batch, frames, noisy.device)], 1)
    r_frames = torch.cat([zeros, _per_frame(r, batch, frames, noisy.device)], 1)
    return model(hidden_states=noisy_in, timestep=t_frames, r_timestep=r_frames, encoder_hidden_states=text,
                 chunk_partition=list(chunk_partition), clean_hidden_states=clean.to(noisy.dtype),
                 clean_timestep=torch.zeros(batch, frames, device=noisy.device), return_dict=False)[0]


def bidirectional(model: AnyFlowFARTransformer3DModel, x: torch.Tensor, t: torch.Tensor | float,
                  r: torch.Tensor | float, text: torch.Tensor) -> torch.Tensor:
    """All F frames of ``x`` (B, F, C, H, W) as one chunk: full attention over the clip, no context, no clean
    copies (the official ``is_causal=False`` mode). t, r: (B,) or scalars; returns u (B, F, C, H, W)."""
    batch, frames = x.shape[:2]
    return model(hidden_states=x, timestep=_per_frame(t, batch, frames, x.device),
                 r_timestep=_per_frame(r, batch, frames, x.device), encoder_hidden_states=text,
                 chunk_partition=[frames], return_dict=False)[0]


class ChunkCache:
    """The KV-cache rollout of one FAR model (official ``training_rollout``/``encode_kv_cache``).

    ``prefill(prefix, text, chunk_partition)`` re-encodes the whole generated prefix at t = r = 0 without
    gradient (the official code does it after every chunk) and replaces the cache: the newest
    ``full_chunk_limit - 1`` prefix chunks at full resolution, older ones compressed, chunk-causal attention.
    Keys are cached before RoPE. ``cache(x_chunk, t, r, text)`` then gives u for the next chunk, which
    attends to the cache and to itself; it runs under autograd (the cache is a constant). Call it any number
    of times (one per denoising step) between prefills. Without a prefill the cache is empty (chunk 0).

    The batch of every call must equal the prefill's, and ``text`` should be the prefill's (the cached keys
    went through the text cross-attention): for CFG, prefill with the [uncond; cond] batch. Use one
    ``ChunkCache`` per rollout (or :meth:`reset`). The cache tensors are allocated per prefill at exactly the
    prefix's size, (2, B, heads, tokens, head_dim) per layer for the full and the compressed part.
    """

    def __init__(self, model: AnyFlowFARTransformer3DModel):
        self.model = model
        self.chunk_partition: list[int] = []
        self._cache: list[dict[str, torch.Tensor]] | None = None

    def reset(self) -> None:
        self.chunk_partition, self._cache = [], None

    @torch.no_grad()
    def prefill(self, prefix: torch.Tensor, text: torch.Tensor, chunk_partition: Sequence[int]) -> None:
        """Encode ``prefix`` (B, Fp, C, H, W), the clean generated chunks ``chunk_partition`` (sum = Fp)."""
        if sum(chunk_partition) != prefix.shape[1] or not chunk_partition:
            raise ValueError(f"chunk_partition {list(chunk_partition)} must split the prefix's "
                             f"{prefix.shape[1]} frames")
        batch, frames, _, height, width = prefix.shape
        cfg = self.model.config
        keep = min(len(chunk_partition), cfg.full_chunk_limit - 1)
        split = len(chunk_partition) - keep
        n_comp = sum(chunk_partition[:split]) * _tokens(height, width, cfg.compressed_patch_size)
        n_full = sum(chunk_partition[split:]) * _tokens(height, width, cfg.patch_size)
        self._cache = self._allocate(batch, n_comp, n_full, prefix.device)
        zeros = torch.zeros(batch, frames, device=prefix.device)
        flag = {"num_cached_chunks": len(chunk_partition), "is_cache_step": True}
        self.model(hidden_states=prefix.to(self._dtype), timestep=zeros, r_timestep=zeros,
                   encoder_hidden_states=text, chunk_partition=list(chunk_partition), kv_cache=self._cache,
                   kv_cache_flag=flag, return_dict=False)
        self.chunk_partition = list(chunk_partition)

    def __call__(self, x_chunk: torch.Tensor, t: torch.Tensor | float, r: torch.Tensor | float,
                 text: torch.Tensor) -> torch.Tensor:
        """u for the next chunk ``x_chunk`` (B, Fk, C, H, W) at (t, r) ((B,) or scalars): (B, Fk, C, H, W)."""
        batch, frames = x_chunk.shape[:2]
        if self._cache is None:
            self._cache = self._allocate(batch, 0, 0, x_chunk.device)
        cached_batch = self._cache[0]["full_cache"].shape[1]
        if cached_batch != batch:
            raise ValueError(f"the cache was filled with batch {cached_batch}, got a chunk of batch {batch}")
        flag = {"num_cached_chunks": len(self.chunk_partition), "is_cache_step": False}
        return self.model(hidden_states=x_chunk, timestep=_per_frame(t, batch, frames, x_chunk.device),
                          r_timestep=_per_frame(r, batch, frames, x_chunk.device), encoder_hidden_states=text,
                          chunk_partition=[*self.chunk_partition, frames], kv_cache=self._cache,
                          kv_cache_flag=flag, return_dict=False)[0]

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.patch_embedding.weight.dtype

    def _allocate(self, batch: int, n_comp: int, n_full: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]]:
        cfg = self.model.config
        shape = (2, batch, cfg.num_attention_heads)

        def empty(tokens: int) -> torch.Tensor:
            return torch.zeros(*shape, tokens, cfg.attention_head_dim, device=device, dtype=self._dtype)

        return [{"compressed_cache": empty(n_comp), "full_cache": empty(n_full)}
                for _ in range(cfg.num_layers)]


# ---------------------------------------------------------------------------------------------- helpers
def _tokens(height: int, width: int, patch: Sequence[int]) -> int:
    return (height // patch[1]) * (width // patch[2])


def _per_frame(v: torch.Tensor | float, batch: int, frames: int, device: torch.device) -> torch.Tensor:
    """(B,) or scalar times -> (B, frames) float32."""
    v = torch.as_tensor(v, dtype=torch.float32, device=device)
    if v.ndim == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"expected timesteps of shape ({batch},) or a scalar, got {tuple(v.shape)}")
    return v[:, None].expand(batch, frames)


def _repeat_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` (B', ...) repeated in block order to batch B = k * B'."""
    if batch % x.shape[0]:
        raise ValueError(f"batch {batch} is not a multiple of the context/clean batch {x.shape[0]}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1))) if batch != x.shape[0] else x
