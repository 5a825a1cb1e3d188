"""The KV cache of a FAR rollout: anystep's side of diffusers' private KV-cache protocol of
``AnyFlowFARTransformer3DModel`` (official ``training_rollout`` / ``encode_kv_cache``).

This module is the one place that knows the cache layout diffusers' FAR blocks read and write (per layer a
``{"full_cache", "compressed_cache"}`` dict of (2, B, heads, tokens, head_dim) tensors, keys before RoPE) and the
``kv_cache_flag`` keys of a prefill and of a chunk call; a diffusers release that changes them changes only this
file (its tests compare a cached rollout with recomputing the prefix without a cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from diffusers import AnyFlowFARTransformer3DModel

from . import far_masks


class ChunkCache:
    """The KV-cache rollout of one FAR model (official ``training_rollout``/``encode_kv_cache``); ``active``
    wraps its model calls (an adapter switch for a LoRA role).

    ``prefill(prefix, text, chunk_partition)`` re-encodes the whole generated prefix at t = r = 0 without
    gradient (the official code does it after every chunk) and replaces the cache: the newest
    ``full_chunk_limit - 1`` prefix chunks at full resolution, older ones compressed, chunk-causal attention.
    Keys are cached before RoPE; the prefill's attention mask is built once per layout
    (:func:`~anystep.models.far_masks.block_mask`). ``cache(x_chunk, t, r, text)`` then gives u for the next chunk, which
    attends to the cache and to itself; it runs under autograd (the cache is a constant). Call it any number
    of times (one per denoising step) between prefills. Without a prefill the cache is empty (chunk 0).

    The batch of every call must equal the prefill's, and ``text`` should be the prefill's (the cached keys
    went through the text cross-attention): for CFG, prefill with the [uncond; cond] batch. Use one
    ``ChunkCache`` per rollout. The cache tensors are allocated per prefill at exactly the
    prefix's size, (2, B, heads, tokens, head_dim) per layer for the full and the compressed part.
    """

    def __init__(self, model: AnyFlowFARTransformer3DModel,
                 active: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model, self._active = model, active
        self.chunk_partition: list[int] = []
        self._cache: list[dict[str, torch.Tensor]] | None = None

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
        mask = far_masks.block_mask(self.model, mode="cache", chunk_partition=chunk_partition, height=height,
                                    width=width, has_clean=False, device=prefix.device)
        with self._active():
            self.model(hidden_states=prefix.to(self._dtype), timestep=zeros, r_timestep=zeros,
                       encoder_hidden_states=text, chunk_partition=list(chunk_partition), kv_cache=self._cache,
                       kv_cache_flag=flag, attention_mask=mask, return_dict=False)
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
        with self._active():
            return self.model(hidden_states=x_chunk, timestep=per_frame(t, batch, frames, x_chunk.device),
                              r_timestep=per_frame(r, batch, frames, x_chunk.device), encoder_hidden_states=text,
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


def _tokens(height: int, width: int, patch: Sequence[int]) -> int:
    return (height // patch[1]) * (width // patch[2])


def per_frame(v: torch.Tensor | float, batch: int, frames: int, device: torch.device) -> torch.Tensor:
    """(B,) or scalar times -> (B, frames) float32."""
    v = torch.as_tensor(v, dtype=torch.float32, device=device)
    if v.ndim == 0:
        v = v.expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"expected timesteps of shape ({batch},) or a scalar, got {tuple(v.shape)}")
    return v[:, None].expand(batch, frames)
