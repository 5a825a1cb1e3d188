"""The shapes world as a :class:`~anystep.worlds.base.World`: rendered clips and their prompts' embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base import ALL, EvalSet
from .judge import ShapesJudge
from .scene import ClipSpec, ShapesConfig, ShapesWorld
from .text import TextConfig, TextEmbedder


class ShapesData:
    """Clips ``(B, F, 3, H, W)`` in [-1, 1] conditioned on their prompt's embedding ``(B, L, D)``; the empty
    prompt (all zeros) is the null one. No exact teacher (the teacher is a trained network); the judge is
    :class:`~anystep.worlds.shapes.judge.ShapesJudge`."""

    name, network = "shapes", "toy_wan"
    content = "videos"   # samples are clips in pixel space, [-1, 1]

    def __init__(self, shapes: ShapesConfig | None = None, text: TextConfig | None = None):
        self.world = ShapesWorld(shapes or ShapesConfig())
        self.text = text or TextConfig()
        self.embedder = TextEmbedder(self.text.dim, self.text.max_tokens)
        self.prompt_embeds = self.embedder(self.world.prompts)   # (P, L, D)
        self.null_cond = self.embedder([""])                      # (1, L, D): all zeros

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c = self.world.cfg
        return (c.frames, 3, c.size, c.size)

    def network_inputs(self) -> dict:
        return {"in_channels": 3, "text_dim": self.text.dim}

    def embed(self, specs: Sequence[ClipSpec]) -> torch.Tensor:
        idx = torch.tensor([self.world.prompt_index(s) for s in specs], device="cpu")
        return self.prompt_embeds[idx]

    def batch(self, n: int, generator: torch.Generator, rows: slice = ALL) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` of a batch of ``n`` clips (only those are rendered) and their prompts' embeddings."""
        specs = self.world.sample_specs(n, generator)[rows]
        return self.world.render(specs), self.embed(specs)

    def conditions(self, n: int, generator: torch.Generator, rows: slice = ALL) -> torch.Tensor:
        """A batch's prompt embeddings, drawn as :meth:`batch` draws them, without rendering the clips."""
        return self.embed(self.world.sample_specs(n, generator)[rows])

    def eval_set(self, n: int, seed: int) -> EvalSet:
        g = torch.Generator().manual_seed(seed)
        specs = self.world.sample_specs(n, g)
        noise = torch.randn((n, *self.shape), generator=g, device="cpu")
        return EvalSet(noise, self.embed(specs), specs)

    def exact_teacher(self) -> None:
        return None

    def judge(self) -> ShapesJudge:
        return ShapesJudge(self.world)
