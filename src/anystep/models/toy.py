"""A small flow-map network for the exact (gmm) world.

Its (t, r) conditioning is the paper's interpolated embedding ``e = (1 - g) E_t(t) + g E_r(r)``, g = 0.25,
computed before the rest of the network, exactly like AnyFlow's dual-timestep embedder in Wan. As a velocity
network (``flowmap=False``) it ignores r; :meth:`ToyFlowMapNet.to_flowmap` copies ``E_t`` into ``E_r``, so at
r = t the flow-map network is the velocity network it started from.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def sinusoidal(t: torch.Tensor, dim: int, max_freq: float) -> torch.Tensor:
    """cos/sin features of t (timestep units) at frequencies geometrically spaced in [1e-3, max_freq] rad per
    unit of *normalised* time t/1000. A low max_freq keeps the central difference accurate (see DESIGN.md)."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(1e-3), math.log(max_freq), half, dtype=torch.float64, device="cpu"))
    arg = (t / 1000.0)[:, None] * freqs[None, :].to(device=t.device, dtype=t.dtype)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


class TimeEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int, max_freq: float):
        super().__init__()
        self.freq_dim, self.max_freq = freq_dim, max_freq
        self.linear_1, self.linear_2 = nn.Linear(freq_dim, dim), nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal(t, self.freq_dim, self.max_freq).to(self.linear_1.weight.dtype)
        return self.linear_2(nn.functional.silu(self.linear_1(feats)))


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        scale, shift_ = self.mod(nn.functional.silu(e)).chunk(2, dim=1)
        z = self.norm(h) * (1 + scale) + shift_
        return h + self.fc2(nn.functional.silu(self.fc1(z)))


class ToyFlowMapNet(nn.Module):
    """``u(x, t, r, label)`` on video-shaped tensors (B, F, C, H, W); label ``num_classes`` is the null class."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, hidden: int = 256, depth: int = 4,
                 freq_dim: int = 64, max_freq: float = 50.0, gate: float = 0.25, flowmap: bool = False):
        super().__init__()
        self.config = {"shape": list(shape), "num_classes": num_classes, "hidden": hidden, "depth": depth,
                       "freq_dim": freq_dim, "max_freq": max_freq}   # what rebuilds it (models.zoo.describe)
        self.shape, self.dim = tuple(shape), math.prod(shape)
        self.num_classes, self.gate, self.flowmap = num_classes, gate, flowmap
        self.time_embedder = TimeEmbedder(freq_dim, hidden, max_freq)
        self.delta_embedder = copy.deepcopy(self.time_embedder)
        self.label_embedder = nn.Embedding(num_classes + 1, hidden)
        self.proj_in = nn.Linear(self.dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, self.dim)

    def to_flowmap(self) -> ToyFlowMapNet:
        """Turn a trained velocity network into the initial flow-map student: E_r := copy of E_t."""
        self.delta_embedder.load_state_dict(self.time_embedder.state_dict())
        self.flowmap = True
        return self

    def embed_times(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``e(t, r) = (1 - g) E_t(t) + g E_r(r)`` (or ``E_t(t)`` for a velocity network)."""
        e_t = self.time_embedder(t)
        if not self.flowmap:
            return e_t
        return (1 - self.gate) * e_t + self.gate * self.delta_embedder(r)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.shape:
            raise ValueError(f"expected x of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        e = self.embed_times(t, r) + self.label_embedder(label)
        h = self.proj_in(x.flatten(1))
        for block in self.blocks:
            h = block(h, e)
        return self.proj_out(self.norm_out(h)).view_as(x)
