"""The real path as a :class:`~anystep.worlds.base.World`: batches of cached Wan2.1 VAE latents and UMT5 prompt
embeddings (made by ``anystep cache`` or ``anystep synthesize``); the base model is a local diffusers folder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import EvalSet


@dataclass
class WanWorldConfig:
    """A local Wan2.1 T2V diffusers folder (the base weights) and a latent cache (VAE latents + UMT5 embeddings;
    the VAE and text encoder are never loaded for training)."""

    model: str | None = None        # local diffusers folder: Wan2.1 T2V, or a released AnyFlow folder (import)
    data: str | None = None         # latent cache folder (index.json + shards)
    max_text_len: int = 512         # prompt embeddings zero-padded to this length (Wan: 512)


class WanData:
    """Latents ``(B, F, C, H, W)`` and prompt embeddings ``(B, max_text_len, D)``; the negative prompt's embedding
    is the null condition (official). No exact teacher and no judge of its own: a student is judged against its
    teacher's samples (:func:`anystep.evaluate.real_judge.reference_judge`)."""

    name, network = "wan", "wan"
    content = "latents"   # samples are VAE latents (the VAE decodes them to videos)

    def __init__(self, wan: WanWorldConfig | None = None):
        self.cfg = wan or WanWorldConfig()
        self._cache = None

    @property
    def cache(self):
        """The latent cache, opened on first use (exporting a run needs no data)."""
        if self._cache is None:
            from ..data.latent_cache import LatentCache

            if not self.cfg.data:
                raise UsageError("world.wan.data is not set: give the latent cache made by `anystep cache` or "
                                 "`anystep synthesize` (world.wan.data=PATH)")
            self._cache = LatentCache(self.cfg.data, max_text_len=self.cfg.max_text_len)
        return self._cache

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c, f, h, w = self.cache.latent_shape
        return (f, c, h, w)

    @property
    def null_cond(self) -> torch.Tensor:
        return self.cache.null_embedding()   # the negative prompt's embedding, (1, L, D)

    def model_folder(self) -> str:
        if not self.cfg.model:
            raise UsageError("world.wan.model is not set: give a local Wan2.1 T2V diffusers folder")
        return self.cfg.model

    def network_inputs(self) -> dict:
        return {"folder": self.model_folder()}

    def batch(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` of a batch of ``n`` items drawn from the cache: only those rows are read."""
        latents, embeds = self.cache.sample(n, generator, rows)
        return latents.permute(0, 2, 1, 3, 4), embeds   # (B, C, F, H, W) -> (B, F, C, H, W)

    def conditions(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> torch.Tensor:
        return self.cache.sample_embeddings(n, generator, rows)

    def eval_set(self, n: int, seed: int) -> EvalSet:
        """The first ``n`` prompts of the cache (its order; cycled when it holds fewer, each repeat with its own
        noise): their cached embeddings, captions as ``meta``, and noises ``(n, F, C, H, W)`` from a CPU
        generator seeded by ``seed``."""
        from ..data.text import pad_embeddings

        if n < 1:
            raise UsageError(f"the evaluation set needs n >= 1 prompts, got {n}")
        cache = self.cache
        if len(cache) == 0:
            raise UsageError(f"the latent cache {self.cfg.data} holds no items to take prompts from")
        picks = [i % len(cache) for i in range(n)]
        cond = pad_embeddings([cache.embedding(i) for i in picks], self.cfg.max_text_len)
        noise = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed), device="cpu")
        return EvalSet(noise, cond, [cache.captions[i] for i in picks])

    def exact_teacher(self) -> None:
        return None

    def judge(self) -> None:
        return None
