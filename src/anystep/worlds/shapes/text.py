"""The shapes world's text "encoder": a tiny deterministic word-vector embedder (no downloads)."""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TextConfig", "TextEmbedder"]


@dataclass
class TextConfig:
    """The shapes world's deterministic text embedder."""

    dim: int = 32
    max_tokens: int = 8


class TextEmbedder:
    """Tiny deterministic text "encoder": ``(B, max_tokens, dim)`` float32 embeddings.

    Words are lower-cased runs of letters / digits. Token ``i`` with word ``w`` embeds as
    ``word_vec(w) + 0.5 * pos(i)`` where ``word_vec(w) ~ N(0, I)`` is drawn from a
    ``torch.Generator`` seeded by ``zlib.crc32(w)`` mixed with ``seed`` (stable across runs and
    machines) and ``pos`` is the sinusoidal position code. Prompts are truncated to
    ``max_tokens`` words; padding positions are exactly zero (like UMT5 embeddings zeroed past
    the prompt length in Wan), so ``""`` (the null / negative condition) embeds to all zeros.
    """

    def __init__(self, dim: int = 32, max_tokens: int = 8, seed: int = 0):
        if dim < 2 or max_tokens < 1:
            raise ValueError(f"need dim >= 2 and max_tokens >= 1, got dim={dim}, max_tokens={max_tokens}")
        self.dim, self.max_tokens, self.seed = dim, max_tokens, seed
        self._cache: dict[str, Tensor] = {}
        pos = torch.arange(max_tokens, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(1000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        code = torch.zeros(max_tokens, dim, dtype=torch.float64)
        code[:, 0::2] = torch.sin(pos * freq)
        code[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
        self.pos_code = (0.5 * code).to(torch.float32)

    @staticmethod
    def tokenize(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())

    def word_vector(self, word: str) -> Tensor:
        v = self._cache.get(word)
        if v is None:
            key = (zlib.crc32(word.encode("utf-8")) + 0x9E3779B1 * (self.seed + 1)) % (2 ** 63)
            v = torch.randn(self.dim, generator=torch.Generator().manual_seed(key))
            self._cache[word] = v
        return v

    def __call__(self, prompts: Sequence[str] | str) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for b, p in enumerate(prompts):
            toks = self.tokenize(p)[: self.max_tokens]
            for i, w in enumerate(toks):
                out[b, i] = self.word_vector(w) + self.pos_code[i]
        return out
