"""The FAR model's causal attention masks, built once per layout and kept.

diffusers' ``AnyFlowFARTransformer3DModel`` builds its flex-attention ``BlockMask`` inside every train and
KV-cache-prefill forward when none is passed (``create_block_mask`` over the whole padded sequence, and
``torch.compile`` cannot trace it). A mask depends only on the call's *layout*: the chunk partition, the model's
full/compressed split (``full_chunk_limit``, one fewer full chunk in a prefill), the tokens per frame of the full
and the compressed patch, whether clean copies follow the noisy chunks, and the device. :func:`block_mask`
builds it once per layout with diffusers' ``model.build_attention_mask`` and returns the same object on every
later call; :func:`dense_mask_of` keeps the boolean matrix the dense (SDPA) path makes of it beside it, and
:func:`allows_all` tells the attention that a (one-chunk, bidirectional) mask masks nothing.

Both caches are per process and bounded (:data:`MAX_LAYOUTS` layouts, least recently used dropped): a Stage-1
run meets at most a few dozen layouts (K chunks x train / prefill).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

MAX_LAYOUTS = 32


@dataclass(frozen=True)
class Layout:
    """Everything a FAR call's ``BlockMask`` depends on (``mode``: "train" or "cache", diffusers' names for the
    teacher-forced forward and the KV-cache prefill)."""

    mode: str
    chunk_partition: tuple[int, ...]
    full_chunk_limit: int
    full_tokens: tuple[int, int]          # tokens per frame (rows, columns) at the full patch
    compressed_tokens: tuple[int, int]    # the same at the compressed patch
    has_clean: bool
    device: str


@dataclass
class _Entry:
    block: BlockMask
    allows_all: bool                     # one chunk, no clean copies: every (unpadded) pair may attend
    dense: torch.Tensor | None = None


_ENTRIES: OrderedDict[Layout, _Entry] = OrderedDict()
builds = 0            # BlockMasks built by this module (for tests and benchmarks)


def layout_of(model, *, mode: str, chunk_partition: Sequence[int], height: int, width: int, has_clean: bool,
              device: torch.device) -> Layout:
    """The layout of a call of ``model`` on latents of ``height`` x ``width`` (latent pixels)."""
    cfg = model.config
    patch, comp = tuple(cfg.patch_size), tuple(cfg.compressed_patch_size)
    return Layout(mode, tuple(int(n) for n in chunk_partition), int(cfg.full_chunk_limit),
                  (height // patch[1], width // patch[2]), (height // comp[1], width // comp[2]), has_clean,
                  str(torch.device(device)))


def block_mask(model, *, mode: str, chunk_partition: Sequence[int], height: int, width: int, has_clean: bool,
               device: torch.device) -> BlockMask:
    """The ``BlockMask`` of this layout for ``model``'s ``attention_mask`` argument: built by diffusers'
    ``model.build_attention_mask`` the first time, the same object afterwards."""
    global builds
    key = layout_of(model, mode=mode, chunk_partition=chunk_partition, height=height, width=width,
                    has_clean=has_clean, device=device)
    entry = _ENTRIES.get(key)
    if entry is None:
        mask = model.build_attention_mask(chunk_partition=list(key.chunk_partition), height=height, width=width,
                                          has_clean_context=has_clean, device=torch.device(device), mode=mode)
        builds += 1
        entry = _ENTRIES[key] = _Entry(mask, allows_all=len(key.chunk_partition) == 1 and not has_clean)
        while len(_ENTRIES) > MAX_LAYOUTS:
            _ENTRIES.popitem(last=False)
    _ENTRIES.move_to_end(key)
    return entry.block


def dense_mask(mask: BlockMask, length: int) -> torch.Tensor:
    """The boolean (length, length) mask of a FAR ``BlockMask`` (True = may attend), evaluated token by token
    from its ``mask_mod`` over the first ``length`` (unpadded) positions: exactly what flex applies there."""
    device = mask.kv_num_blocks.device
    idx = torch.arange(length, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask.mask_mod(zero, zero, idx[:, None], idx[None, :]).expand(length, length).bool()


def _entry(mask: BlockMask) -> _Entry | None:
    return next((e for e in reversed(_ENTRIES.values()) if e.block is mask), None)


def allows_all(mask: BlockMask) -> bool:
    """Whether ``mask`` is a kept mask that lets every token attend to every token (a one-chunk call without
    clean copies: the bidirectional mode), so attention needs no mask (the official code runs SDPA there)."""
    entry = _entry(mask)
    return entry is not None and entry.allows_all


def dense_mask_of(mask: BlockMask, length: int) -> torch.Tensor | None:
    """:func:`dense_mask` of a ``BlockMask`` this module built, made once and kept with it; None for any other
    mask (the caller makes its own)."""
    entry = _entry(mask)
    if entry is None:
        return None
    if entry.dense is None or entry.dense.shape[0] != length:
        entry.dense = dense_mask(mask, length)
    return entry.dense


def clear() -> None:
    """Forget every kept mask."""
    _ENTRIES.clear()
