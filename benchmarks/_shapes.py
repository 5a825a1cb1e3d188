"""What the shapes-world benchmarks share: thread setup and the demo's tiny Wan configuration."""

from __future__ import annotations

import torch

from anystep.config import ModelConfig, WorldConfig
from anystep.worlds.binding import ShapesBinding


def shapes_setup(threads: int | None) -> tuple[ShapesBinding, ModelConfig]:
    """Threads, denormal flushing and the seed as the CLI sets them; the shapes binding and the model config
    of the shipped teacher (patch 1x4x4, 4 heads x 16, 4 layers, FFN 256)."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    binding = ShapesBinding(WorldConfig(name="shapes"))
    return binding, ModelConfig(patch=(1, 4, 4), heads=4, head_dim=16, layers=4, ffn_dim=256)
