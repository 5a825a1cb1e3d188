"""The causal (FAR) student as one trainable module: diffusers' ``AnyFlowFARTransformer3DModel`` with its chunk
partition, and its three ways of being called (:mod:`anystep.models.far`).

``FARStudent(x, t, r, cond)`` follows anystep's flow-map contract with a *teacher-forcing condition*
``cond = {"text": (B, L, D), "clean": (B, Fn, C, H, W), "context": (B, Fc, C, H, W)}`` (``context`` absent when
the clip has no compressed chunks): ``x`` are the noisy full-resolution chunks, ``clean`` their ground-truth
copies. Because the whole teacher-forcing input travels in ``cond``, the Stage-1 objective's row selections,
concatenations and condition dropout (which swaps only ``text``) work on it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AnyFlowFARTransformer3DModel
from torch import nn

from .far import ChunkCache, bidirectional, set_causal_attention, teacher_forced


class FARStudent(nn.Module):
    """A FAR transformer and its chunk partition (latent frames per chunk)."""

    def __init__(self, transformer: AnyFlowFARTransformer3DModel, chunk_partition: Sequence[int],
                 attention: str = "auto"):
        super().__init__()
        self.transformer = transformer
        self.chunk_partition = tuple(int(n) for n in chunk_partition)
        self.attention = attention
        set_causal_attention(transformer, attention)

    @property
    def full_chunk_limit(self) -> int:
        return self.transformer.config.full_chunk_limit

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: dict) -> torch.Tensor:
        """Teacher forcing: u for the noisy chunks ``x`` given ``cond`` (see the module docstring)."""
        return teacher_forced_cond(self.transformer, self.chunk_partition, x, t, r, cond)

    def bidirectional(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """All frames as one chunk (full attention): the same weights as a bidirectional flow map."""
        return bidirectional(self.transformer, x, t.to(x.device), r.to(x.device), text)

    def cache(self) -> ChunkCache:
        """A fresh KV cache for a chunk-by-chunk rollout."""
        return ChunkCache(self.transformer)


def teacher_forced_cond(transformer: AnyFlowFARTransformer3DModel, chunk_partition: Sequence[int],
                        x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: dict) -> torch.Tensor:
    """:func:`~anystep.models.far.teacher_forced` with the teacher-forcing condition dict; the chunks are the
    first ones of ``chunk_partition`` that cover [context | noisy]."""
    frames = sum(c.shape[1] for c in (cond.get("context"), x) if c is not None)
    return teacher_forced(transformer, x, t.to(x.device), r.to(x.device), cond["text"], clean=cond["clean"],
                          context=cond.get("context"), chunk_partition=chunks_covering(chunk_partition, frames))


def chunks_covering(partition: Sequence[int], frames: int) -> list[int]:
    """The first chunks of ``partition`` that make exactly ``frames`` frames (an error otherwise)."""
    total, out = 0, []
    for n in partition:
        if total == frames:
            break
        out.append(n)
        total += n
    if total != frames:
        raise ValueError(f"{frames} frames are not a whole number of chunks of {list(partition)}")
    return out
