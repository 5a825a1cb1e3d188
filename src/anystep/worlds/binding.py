"""One interface to both toy worlds, so the algorithms, the CLI and the sweep never ask which one they train.

A binding gives: training batches ``(x0 (B, F, C, H, W), cond)``, the null condition, a fresh velocity
network (the teacher architecture), the student built from a velocity network, the reference teacher for
sweeps, a fixed evaluation set, the world's exact metrics, and a picture of samples.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from torch import nn

from .. import rng
from ..config import ModelConfig, WorldConfig
from ..flowmap import FlowMap
from ..models.toy import ToyFlowMapNet
from ..models.wan import AnyFlowStudent, WanVelocity, student_from_wan, tiny_wan
from .gmm import GMMWorld
from .shapes import ShapesJudge, ShapesWorld, TextEmbedder


@dataclass
class EvalSet:
    noise: torch.Tensor   # (n, F, C, H, W)
    cond: Any             # batch-first condition
    meta: Any             # what the metrics need (labels, clip specs)


class GMMBinding:
    """The exact world: class labels as the condition, the analytic teacher as reference."""

    name = "gmm"
    primary_metric, higher_is_better = "fd", False

    def __init__(self, cfg: WorldConfig):
        self.world = GMMWorld(cfg.gmm)
        self.shape = self.world.shape
        self.null_cond = torch.tensor([self.world.null_label], device="cpu")
        self._reference: dict[tuple[int, float], torch.Tensor] = {}

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.world.sample_labels(n, generator)
        return self.world.sample_data(labels, generator), labels

    def velocity_net(self, m: ModelConfig) -> nn.Module:
        return ToyFlowMapNet(self.shape, self.world.num_classes, hidden=m.hidden, depth=m.depth,
                             max_freq=m.max_freq, gate=m.gate_value, flowmap=False)

    def student_from(self, velocity_net: nn.Module, m: ModelConfig) -> nn.Module:
        if m.deltatime_type != "r":
            raise ValueError("the gmm network supports deltatime_type 'r' only")
        student = copy.deepcopy(velocity_net).to_flowmap()
        student.gate = m.gate_value
        return student

    def reference_teacher(self) -> FlowMap:
        """The analytic velocity (exact, float64 inside)."""
        world = self.world

        def u(x, t, r, labels):
            return world.velocity(x.double(), t.double(), labels).to(x.dtype)
        return u

    def eval_set(self, n: int, seed: int) -> EvalSet:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n, device="cpu") % self.world.num_classes
        noise = rng.normal((n, *self.shape), g)
        return EvalSet(noise, labels, labels)

    def evaluate(self, samples: torch.Tensor, ev: EvalSet, guidance: float) -> dict[str, float]:
        """Exact metrics; the endpoint error is against the exact guided ODE from the same noise, solved once
        per evaluation set and guidance (every sampler and N of a sweep shares it)."""
        out = self.world.evaluate(samples, ev.meta)
        key = (id(ev), guidance)
        if key not in self._reference:
            self._reference = {key: self.world.sample_ode(ev.noise.double(), ev.meta, guidance)}
        diff = samples.detach().double() - self._reference[key]
        out["endpoint_error"] = float(diff.pow(2).mean().sqrt())
        return out

    def save_picture(self, rows: dict[str, torch.Tensor], ev: EvalSet, path: Path) -> Path:
        """Scatter of the first two coordinates per row (N), coloured by class, modes marked."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(rows)
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.4), squeeze=False)
        means = self.world.means.reshape(-1, self.world.dim)
        for ax, name in zip(axes[0], names):
            pts = rows[name].flatten(1)
            ax.scatter(pts[:, 0], pts[:, 1], c=ev.meta, s=3, cmap="tab10", vmin=0, vmax=9)
            ax.scatter(means[:, 0], means[:, 1], marker="x", c="k", s=20)
            ax.set_title(name, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
        fig.tight_layout()
        path = Path(path).with_suffix(".png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


class ShapesBinding:
    """The video world: prompts embedded by a fixed text embedder; the teacher is a trained tiny Wan."""

    name = "shapes"
    primary_metric, higher_is_better = "total", True

    def __init__(self, cfg: WorldConfig):
        self.world = ShapesWorld(cfg.shapes)
        self.judge = ShapesJudge(self.world)
        self.shape = (cfg.shapes.frames, 3, cfg.shapes.size, cfg.shapes.size)
        self.embedder = TextEmbedder(cfg.text.dim, cfg.text.max_tokens)
        self.prompt_embeds = self.embedder(self.world.prompts)   # (P, L, D)
        self.null_cond = self.embedder([""])                      # (1, L, D): all zeros
        self.text_dim = cfg.text.dim

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        videos, specs = self.world.sample(n, generator)
        return videos, self.embed(specs)

    def embed(self, specs) -> torch.Tensor:
        idx = torch.tensor([self.world.prompt_index(s) for s in specs], device="cpu")
        return self.prompt_embeds[idx]

    def velocity_net(self, m: ModelConfig) -> nn.Module:
        return WanVelocity(tiny_wan(in_channels=3, text_dim=self.text_dim, heads=m.heads, head_dim=m.head_dim,
                                    layers=m.layers, ffn_dim=m.ffn_dim, patch=tuple(m.patch)))

    def student_from(self, velocity_net: nn.Module, m: ModelConfig) -> nn.Module:
        return AnyFlowStudent(student_from_wan(velocity_net.transformer, m.gate_value, m.deltatime_type))

    def reference_teacher(self) -> None:
        return None  # the shapes teacher is a trained network, loaded from its checkpoint

    def eval_set(self, n: int, seed: int) -> EvalSet:
        g = torch.Generator().manual_seed(seed)
        specs = self.world.sample_specs(n, g)
        noise = rng.normal((n, *self.shape), g)
        return EvalSet(noise, self.embed(specs), specs)

    def evaluate(self, samples: torch.Tensor, ev: EvalSet, guidance: float) -> dict[str, float]:
        """The judge's clip scores; for chunked (causal-world) clips also the Quality of the first two and of
        the last two chunks, and their gap (exposure bias shows as late chunks scoring below early ones)."""
        samples = samples.clamp(-1, 1)
        out = self.judge.evaluate(samples, ev.meta)
        if self.world.cfg.chunk_partition and len(self.world.cfg.chunk_partition) >= 4:
            quality = self.judge.judge_chunks(samples, ev.meta)["quality"].mean(0)   # (K,)
            out["early_quality"] = float(quality[:2].mean())
            out["late_quality"] = float(quality[-2:].mean())
            out["late_gap"] = out["early_quality"] - out["late_quality"]
        return out

    def save_picture(self, rows: dict[str, torch.Tensor], ev: EvalSet, path: Path) -> Path:
        from ..evaluate.media import save_video_grid
        return save_video_grid(rows, path, columns=[s.prompt() for s in ev.meta])


class WanBinding:
    """The real path: batches of cached Wan2.1 VAE latents and UMT5 prompt embeddings (``anystep cache`` /
    ``anystep synthesize``); the base model is a local diffusers folder. There is no exact judge here: a
    trained student is exported (``anystep export``) and sampled with diffusers' ``AnyFlowPipeline``."""

    name = "wan"
    primary_metric, higher_is_better = None, True

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg.wan
        self._cache = None

    @property
    def cache(self):
        """The latent cache, opened on first use (exporting a run needs no data)."""
        if self._cache is None:
            from ..data.shards import LatentCache

            if not self.cfg.data:
                raise ValueError("world.wan.data is not set: give the latent cache made by `anystep cache` "
                                 "or `anystep synthesize` (world.wan.data=PATH)")
            self._cache = LatentCache(self.cfg.data, max_text_len=self.cfg.max_text_len)
        return self._cache

    @property
    def shape(self) -> tuple[int, int, int, int]:
        c, f, h, w = self.cache.latent_shape
        return (f, c, h, w)

    @property
    def null_cond(self) -> torch.Tensor:
        return self.cache.null_embedding()   # the negative prompt's embedding, (1, L, D)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        latents, embeds = self.cache.sample(n, generator)
        return latents.permute(0, 2, 1, 3, 4), embeds   # (B, C, F, H, W) -> (B, F, C, H, W)

    def model_folder(self) -> str:
        if not self.cfg.model:
            raise ValueError("world.wan.model is not set: give a local Wan2.1 T2V diffusers folder")
        return self.cfg.model

    def velocity_net(self, m: ModelConfig) -> nn.Module:
        from ..models.folder import load_transformer

        transformer = load_transformer(self.model_folder())
        if not isinstance(transformer, WanTransformer3DModel):
            raise ValueError(f"{self.cfg.model} holds a {type(transformer).__name__}, not a Wan transformer; "
                             "to train on an AnyFlow model use LoRA (model.lora_rank > 0)")
        return WanVelocity(transformer)

    def student_from(self, velocity_net: nn.Module, m: ModelConfig) -> nn.Module:
        return AnyFlowStudent(student_from_wan(velocity_net.transformer, m.gate_value, m.deltatime_type))

    def reference_teacher(self) -> None:
        return None

    def _no_judge(self, *args, **kwargs):
        raise ValueError("the wan world has no exact judge or sweep: export the student with `anystep export` "
                         "and sample it with diffusers' AnyFlowPipeline")

    eval_set = evaluate = save_picture = _no_judge


class OnDevice:
    """A binding whose batches and null condition live on ``device`` (the data itself is made on the CPU,
    from the CPU generator, so a run draws the same data on every device)."""

    def __init__(self, binding, device: torch.device):
        self.binding, self.device = binding, torch.device(device)
        self.null_cond = _to(binding.null_cond, self.device)

    def batch(self, n: int, generator: torch.Generator):
        x0, cond = self.binding.batch(n, generator)
        return x0.to(self.device), _to(cond, self.device)

    def __getattr__(self, name: str):
        return getattr(self.binding, name)


def _to(cond: Any, device: torch.device) -> Any:
    return cond.to(device) if isinstance(cond, torch.Tensor) else cond


def make_binding(cfg: WorldConfig) -> GMMBinding | ShapesBinding | WanBinding:
    return {"gmm": GMMBinding, "shapes": ShapesBinding, "wan": WanBinding}[cfg.name](cfg)
