"""The "shapes" toy video world: one coloured shape moving at constant speed, plus an exact judge.

A clip shows one shape (disk / square / triangle) of one colour gliding in a straight line at a
constant ``speed`` (pixels per frame) over a plain background; it never leaves the frame. Its
prompt is templated: ``"a red disk moving left"``. The world also ships

* :class:`TextEmbedder`: a tiny deterministic word-vector "text encoder" (no downloads);
* :meth:`ShapesWorld.judge`: an exact, VBench-in-spirit judge. Quality (clean background,
  temporal consistency, smooth motion) and Semantic (colour, shape, direction right) sub-scores
  per clip in [0, 1], ``total = 0.8 quality + 0.2 semantic``;
* :meth:`ShapesWorld.judge_chunks`: the same scores per chunk of a chunk partition (the FAR / chunk-causal
  path: does quality fall in late chunks?), and :func:`causal_config`, the longer clips it is meant for.

Conventions
-----------
Videos are ``(B, F, C, H, W)`` tensors, C = 3 (RGB), values in [-1, 1] (the network's data
space). Geometry is continuous: pixel ``(row i, column j)`` covers ``[j, j+1] x [i, i+1]`` and
its centre is ``(j + 0.5, i + 0.5)``; ``x`` grows to the right and ``y`` grows *down*, so
"up" means decreasing ``y``. A :class:`ClipSpec` gives the shape's centre ``(x0, y0)`` in
frame 0 (the centre of its bounding box); in frame ``t`` the centre is ``(x0, y0) + t * speed
* unit(direction)``. Edges are antialiased by supersampling (``supersample**2`` point samples
per pixel), so the rendered area and centroid move smoothly at sub-pixel positions.

Everything is deterministic given a ``torch.Generator`` (or an int seed) and runs on the CPU.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BACKGROUNDS",
    "CAUSAL_PARTITION",
    "COLORS",
    "DIRECTIONS",
    "SHAPES",
    "ClipSpec",
    "JudgeConfig",
    "ShapesConfig",
    "ShapesWorld",
    "TextEmbedder",
    "causal_config",
    "chunk_bounds",
]

# Colours in [0, 1] RGB (the judge works in this space; rendering maps to [-1, 1]).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),  # -1 in all channels of the [-1, 1] data space
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}
SHAPES: tuple[str, ...] = ("disk", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# unit displacement per frame (dx, dy) in image coordinates (y down)
_DIR_VEC: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}


def _check_name(kind: str, name: str, allowed: Sequence[str]) -> None:
    if name not in allowed:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {tuple(allowed)}")


def chunk_bounds(chunk_partition: Sequence[int], frames: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` frame ranges of a chunk partition (frames per chunk, in order), e.g.
    ``(1, 2, 2, 2, 2)`` of 9 frames -> ``[(0, 1), (1, 3), (3, 5), (5, 7), (7, 9)]``. Raises unless
    every chunk has >= 1 frame and they sum to ``frames``."""
    parts = tuple(chunk_partition)
    if not parts or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in parts):
        raise ValueError(f"a chunk partition is a non-empty list of integers >= 1, got {list(parts)}")
    if sum(parts) != frames:
        raise ValueError(f"chunk partition {list(parts)} covers {sum(parts)} frames, not the clip's {frames}")
    bounds, start = [], 0
    for k in parts:
        bounds.append((start, start + k))
        start += k
    return bounds


# The official FAR-style partition of the causal world: a 1-frame first chunk, then equal chunks.
CAUSAL_PARTITION: tuple[int, ...] = (1, 2, 2, 2, 2)


def causal_config(**overrides) -> ShapesConfig:
    """The shapes world for the chunk-causal (FAR) path: 9-frame 16x16 clips at speed 1 px/frame
    (5 + 1 * 8 = 13 <= 16 px of travel room) with the chunk partition ``[1, 2, 2, 2, 2]``.

    Judge references on 256 clips, :meth:`ShapesWorld.judge` ``total`` (the 4-frame default world in
    brackets) / :meth:`ShapesWorld.judge_chunks` ``total`` of every chunk: real 1.000 (1.000) / 1.000;
    +0.03 noise 0.986 (0.987) / 0.993; +0.2 noise 0.757 (0.761) / 0.78; per-prompt mean "blur"
    0.679 (0.558) / 0.416; static 0.703 (0.703) / 0.703; pure noise 0.239 (0.250) / 0.057. The clip
    judge's blur reference is higher than at 4 frames because the start positions span less (the
    travel takes half the frame), so the per-prompt mean is less smeared; the per-chunk judge, which
    holds each frame's area and colour to the prompt's, puts blur and pure noise much lower.
    ``overrides`` are :class:`ShapesConfig` fields (e.g. ``colors=("red", "blue")``)."""
    kw = {"size": 16, "frames": 9, "shape_size": 5.0, "speed": 1.0, "chunk_partition": CAUSAL_PARTITION}
    kw.update(overrides)
    return ShapesConfig(**kw)


# ----------------------------------------------------------------------------------------------
# configuration and clip specs
# ----------------------------------------------------------------------------------------------


@dataclass
class ShapesConfig:
    """Configuration of :class:`ShapesWorld`.

    ``shape_size`` is the disk diameter / square side / triangle base and height, in pixels.
    ``margin`` keeps the shape's bounding box that many pixels inside the frame. The shape must
    fit with its whole travel: ``shape_size + speed * (frames - 1) + 2 * margin <= size``.
    ``chunk_partition`` (optional, frames per chunk, summing to ``frames``) is the partition
    :meth:`ShapesWorld.judge_chunks` uses when it is given none; ``()`` = not set. It does not
    change the clips. See :func:`causal_config` for the chunk-causal (FAR) world.
    """

    size: int = 16
    frames: int = 4
    shape_size: float = 5.0
    speed: float = 2.0
    background: str = "black"
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    directions: tuple[str, ...] = DIRECTIONS
    antialias: bool = True
    supersample: int = 16
    margin: float = 0.0
    chunk_partition: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.colors, self.shapes, self.directions = (
            tuple(self.colors), tuple(self.shapes), tuple(self.directions))
        self.chunk_partition = tuple(self.chunk_partition)
        if self.chunk_partition:
            chunk_bounds(self.chunk_partition, self.frames)  # validates
        _check_name("background", self.background, tuple(BACKGROUNDS))
        for kind, names, allowed in (("color", self.colors, tuple(COLORS)),
                                     ("shape", self.shapes, SHAPES),
                                     ("direction", self.directions, DIRECTIONS)):
            if not names:
                raise ValueError(f"ShapesConfig needs at least one {kind}")
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate {kind} names in {names}")
            for n in names:
                _check_name(kind, n, allowed)
        if self.size < 4 or self.frames < 2:
            raise ValueError(f"need size >= 4 and frames >= 2, got size={self.size}, frames={self.frames}")
        if not (self.shape_size >= 2.0 and self.speed > 0.0 and self.margin >= 0.0 and self.supersample >= 1):
            raise ValueError("need shape_size >= 2, speed > 0, margin >= 0, supersample >= 1")
        need = self.shape_size + self.speed * (self.frames - 1) + 2 * self.margin
        if need > self.size:
            raise ValueError(
                f"shape_size + speed*(frames-1) + 2*margin = {need:g} does not fit in size {self.size}")
        bg = torch.tensor(BACKGROUNDS[self.background])
        for c in self.colors:
            if float((torch.tensor(COLORS[c]) - bg).norm()) < 0.5:
                raise ValueError(f"color {c!r} is too close to the {self.background} background")


@dataclass(frozen=True)
class ClipSpec:
    """One clip: what is shown and where the shape's bounding-box centre is in frame 0."""

    color: str
    shape: str
    direction: str
    x0: float = 0.0
    y0: float = 0.0

    def __post_init__(self) -> None:
        _check_name("color", self.color, tuple(COLORS))
        _check_name("shape", self.shape, SHAPES)
        _check_name("direction", self.direction, DIRECTIONS)

    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"

    @staticmethod
    def from_prompt(prompt: str, x0: float = 0.0, y0: float = 0.0) -> ClipSpec:
        """Parse ``"a <color> <shape> moving <direction>"`` (the inverse of :meth:`prompt`)."""
        m = re.fullmatch(r"\s*a\s+(\w+)\s+(\w+)\s+moving\s+(\w+)\s*", prompt)
        if m is None:
            raise ValueError(f"not a shapes prompt: {prompt!r} (expected 'a <color> <shape> moving <dir>')")
        return ClipSpec(m.group(1), m.group(2), m.group(3), x0, y0)


@dataclass(frozen=True)
class JudgeConfig:
    """Constants of :meth:`ShapesWorld.judge` (colour distances in [0, 1] RGB, lengths in pixels).

    ``strong_frac``: a pixel is *strong foreground* when its distance to the background colour
    exceeds ``strong_frac * min_k |colour_k - background|``. ``top_frac``: the frame's
    foreground colour is the mean of the strong pixels within ``top_frac`` of the largest
    distance. ``dirt_lo``/``dirt_hi``: a background-region pixel at distance ``d`` is
    ``clamp((d - lo) / (hi - lo), 0, 1)`` dirty (tolerates ~0.04 per-channel bias in [-1, 1]
    units and noise of std ~0.03; noise of std 0.2 makes about half the background dirty).
    ``region_slack``: the dilated foreground region may be this many times the calibrated
    clean-shape region before the excess counts as dirt. ``area_slack``: the foreground area
    must lie in ``[min_area / slack, max_area * slack]`` of the calibrated shape areas.
    ``k_*``: decay rates of the exponential penalties (see the ``_score_*`` docstrings).
    ``chunk_area_tol`` / ``chunk_color_tol``: deviations of a frame's relative area / colour from its
    reference that :meth:`ShapesWorld.judge_chunks` forgives (clean renders vary up to ~2% in
    estimated area and ~0.025 in estimated colour with the sub-pixel position).
    """

    strong_frac: float = 0.5
    top_frac: float = 0.95
    dirt_lo: float = 0.06
    dirt_hi: float = 0.14
    region_slack: float = 1.5
    area_slack: float = 1.5
    k_area: float = 4.0
    k_color: float = 4.0
    k_accel: float = 4.0
    k_speed: float = 2.0
    chunk_area_tol: float = 0.05
    chunk_color_tol: float = 0.05


# ----------------------------------------------------------------------------------------------
# the world
# ----------------------------------------------------------------------------------------------


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


class ShapesWorld:
    """Procedural clips, prompts and the exact judge of the shapes world (see module docstring)."""

    def __init__(self, cfg: ShapesConfig | None = None, judge_cfg: JudgeConfig | None = None):
        self.cfg = cfg if cfg is not None else ShapesConfig()
        self.jcfg = judge_cfg if judge_cfg is not None else JudgeConfig()
        c = self.cfg
        self.shape = (c.frames, 3, c.size, c.size)
        self.prompts: list[str] = [
            f"a {col} {shp} moving {d}" for col in c.colors for shp in c.shapes for d in c.directions]
        self._prompt_index = {p: i for i, p in enumerate(self.prompts)}
        self._bg = torch.tensor(BACKGROUNDS[c.background], dtype=torch.float32)
        self._palette = torch.tensor([COLORS[n] for n in c.colors], dtype=torch.float32)
        self._contrast = float((self._palette - self._bg).norm(dim=-1).min())
        self._calibrate()

    # ------------------------------------------------------------------ specs and rendering
    @property
    def travel(self) -> float:
        """Distance (pixels) the shape moves from the first to the last frame."""
        return self.cfg.speed * (self.cfg.frames - 1)

    def prompt_index(self, spec: ClipSpec | str) -> int:
        p = spec.prompt() if isinstance(spec, ClipSpec) else spec
        if p not in self._prompt_index:
            raise ValueError(f"prompt {p!r} is not one of this world's {len(self.prompts)} prompts")
        return self._prompt_index[p]

    def position_range(self, direction: str) -> tuple[tuple[float, float], tuple[float, float]]:
        """``((x_lo, x_hi), (y_lo, y_hi))`` of valid frame-0 centres for ``direction``."""
        _check_name("direction", direction, DIRECTIONS)
        c = self.cfg
        lo, hi = c.shape_size / 2 + c.margin, c.size - c.shape_size / 2 - c.margin
        dx, dy = _DIR_VEC[direction]
        rng = []
        for u in (dx, dy):
            if u > 0:
                rng.append((lo, hi - self.travel))
            elif u < 0:
                rng.append((lo + self.travel, hi))
            else:
                rng.append((lo, hi))
        return rng[0], rng[1]

    def sample_specs(self, n: int, generator: torch.Generator | int | None = None,
                     prompt: str | None = None) -> list[ClipSpec]:
        """``n`` random clips: uniform prompt (or the given ``prompt``), uniform valid start."""
        g = _as_generator(generator)
        c = self.cfg
        if prompt is not None:
            idx = [self.prompt_index(ClipSpec.from_prompt(prompt))] * n
        else:
            idx = torch.randint(len(self.prompts), (n,), generator=g).tolist()
        u = torch.rand(n, 2, generator=g, dtype=torch.float64).tolist()
        specs = []
        for i, (ux, uy) in zip(idx, u):
            col = c.colors[i // (len(c.shapes) * len(c.directions))]
            shp = c.shapes[(i // len(c.directions)) % len(c.shapes)]
            d = c.directions[i % len(c.directions)]
            (xl, xh), (yl, yh) = self.position_range(d)
            specs.append(ClipSpec(col, shp, d, xl + ux * (xh - xl), yl + uy * (yh - yl)))
        return specs

    def _coverage(self, shape: str, cx: Tensor, cy: Tensor) -> Tensor:
        """Coverage ``(N, H, W)`` in [0, 1] of ``shape`` centred at ``(cx, cy)`` (N,).

        Every shape is convex, so each horizontal line ``y`` cuts it in one interval
        ``[cx - r(y), cx + r(y)]``. With ``antialias`` the coverage is the mean over
        ``supersample`` sub-rows per pixel of the exact interval/pixel overlap length (exact in
        ``x``, supersampled in ``y``); without it, one point sample at the pixel centre."""
        c = self.cfg
        ss = c.supersample if c.antialias else 1
        h = c.shape_size / 2
        cx, cy = cx.to(torch.float32), cy.to(torch.float32)
        rows = (torch.arange(c.size * ss, dtype=torch.float32) + 0.5) / ss  # sub-row y coordinates
        dy = rows[None, :] - cy[:, None]  # (N, Hs)
        inside = dy.abs() <= h
        if shape == "disk":
            r = (h * h - dy * dy).clamp_min(0.0).sqrt()
        elif shape == "square":
            r = torch.full_like(dy, h)
        elif shape == "triangle":  # apex up (at y = cy - h), base of width 2h at y = cy + h
            r = 0.5 * (dy + h)
        else:
            raise ValueError(f"unknown shape {shape!r}")
        r = torch.where(inside, r, torch.zeros_like(r))
        a = (cx[:, None] - r)[..., None]  # (N, Hs, 1)
        b = (cx[:, None] + r)[..., None]
        col = torch.arange(c.size, dtype=torch.float32)  # pixel j covers [j, j+1]
        if c.antialias:
            cov = (torch.minimum(b, col + 1.0) - torch.maximum(a, col)).clamp(0.0, 1.0)
        else:
            cov = ((a <= col + 0.5) & (col + 0.5 <= b)).to(torch.float32)
        cov = cov * inside[..., None]
        return cov.view(-1, c.size, ss, c.size).mean(2)

    def centers(self, specs: Sequence[ClipSpec]) -> Tensor:
        """Bounding-box centres ``(B, F, 2)`` (x, y) of the shape in every frame."""
        t = torch.arange(self.cfg.frames, dtype=torch.float64)
        p0 = torch.tensor([[s.x0, s.y0] for s in specs], dtype=torch.float64).view(-1, 1, 2)
        v = torch.tensor([_DIR_VEC[s.direction] for s in specs], dtype=torch.float64).view(-1, 1, 2)
        return p0 + self.cfg.speed * t.view(1, -1, 1) * v

    def render(self, specs: Sequence[ClipSpec]) -> Tensor:
        """Render clips ``(B, F, 3, H, W)`` float32 in [-1, 1]."""
        c = self.cfg
        specs = list(specs)
        b, f = len(specs), c.frames
        for s in specs:
            if not isinstance(s, ClipSpec):
                raise TypeError(f"render expects ClipSpec objects, got {type(s).__name__}")
        ctr = self.centers(specs) if specs else torch.zeros(0, f, 2, dtype=torch.float64)
        alpha = torch.zeros(b, f, c.size, c.size)
        for shp in SHAPES:
            idx = [i for i, s in enumerate(specs) if s.shape == shp]
            if idx:
                ii = torch.tensor(idx)
                cov = self._coverage(shp, ctr[ii, :, 0].reshape(-1), ctr[ii, :, 1].reshape(-1))
                alpha[ii] = cov.view(len(idx), f, c.size, c.size)
        col = torch.tensor([COLORS[s.color] for s in specs], dtype=torch.float32).view(b, 1, 3, 1, 1)
        bg = self._bg.view(1, 1, 3, 1, 1)
        img = bg + alpha[:, :, None] * (col - bg)
        return (img * 2.0 - 1.0).clamp(-1.0, 1.0)

    def sample(self, n: int, generator: torch.Generator | int | None = None) -> tuple[Tensor, list[ClipSpec]]:
        specs = self.sample_specs(n, generator)
        return self.render(specs), specs

    def mean_videos(self, specs: Sequence[ClipSpec | str], n_average: int = 64,
                    generator: torch.Generator | int | None = None) -> Tensor:
        """Per-prompt mean videos ``(B, F, 3, H, W)``: the average of ``n_average`` random clips
        with the prompt of each spec (random start positions). This is the regression-to-the-mean
        output of an ideal one-step L2 sampler and a useful "blurry" baseline for the judge."""
        g = _as_generator(generator)
        prompts = [s.prompt() if isinstance(s, ClipSpec) else s for s in specs]
        uniq = list(dict.fromkeys(prompts))
        means = {}
        for p in uniq:
            means[p] = self.render(self.sample_specs(n_average, g, prompt=p)).mean(0)
        if not prompts:
            return torch.zeros(0, *self.shape)
        return torch.stack([means[p] for p in prompts])

    # ------------------------------------------------------------------ judge
    def _calibrate(self) -> None:
        """Measure reference statistics of clean renders (area, dilated-region size and fill
        ratio per shape) with a fixed internal seed; the judge's thresholds derive from them."""
        g = torch.Generator().manual_seed(12345)
        area: dict[str, float] = {}
        region: dict[str, float] = {}
        fill: dict[str, tuple[float, float]] = {}
        for shp in self.cfg.shapes:
            specs = [ClipSpec(self.cfg.colors[0], shp, s.direction, s.x0, s.y0)
                     for s in self.sample_specs(32, g)]
            st = self._analyse(self.render(specs))
            area[shp] = float(st["area"].mean())
            region[shp] = float(st["region_size"].mean())
            fill[shp] = (float(st["fill"].median()), float(st["skew"].median()))
        self.ref_area, self.ref_shape_features = area, fill
        self._shape_protos = torch.tensor([fill[s] for s in self.cfg.shapes])  # (S, 2)
        self._area_lo = min(area.values()) / self.jcfg.area_slack
        self._area_hi = max(area.values()) * self.jcfg.area_slack
        self._region_allow = max(region.values()) * self.jcfg.region_slack

    def _check_videos(self, videos: Tensor) -> Tensor:
        f, c, h, w = self.shape
        if not isinstance(videos, Tensor) or videos.dim() != 5 or tuple(videos.shape[1:]) != self.shape:
            got = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
            raise ValueError(f"expected videos of shape (B, {f}, {c}, {h}, {w}), got {got}")
        if not videos.is_floating_point():
            raise ValueError(f"expected a floating-point video tensor, got {videos.dtype}")
        return videos

    def _analyse(self, videos: Tensor) -> dict[str, Tensor]:
        """Per-frame statistics of ``(B, F, 3, H, W)`` videos in [-1, 1] (clamped, as a viewer would;
        NaN counts as mid-grey).

        * ``d``: per-pixel distance to the background colour in [0, 1] RGB.
        * ``strong``: ``d > strong_frac * contrast``; ``region``: strong dilated by a 3x3 box.
        * ``color`` (B, F, 3): mean colour of the strong pixels with ``d >= top_frac * max d``.
        * ``alpha``: coverage estimate, projection of ``pixel - bg`` on ``color - bg``, clamped
          to [0, 1] and zero outside ``region``; ``area`` = sum alpha; ``centroid`` (B, F, 2)
          = alpha-weighted mean pixel centre (x, y).
        * ``fill``: ``area / (width * height)`` with the soft extents ``width = sum_cols max_rows
          alpha`` and ``height = sum_rows max_cols alpha`` (1 square, ~pi/4 disk, ~0.6 triangle).
        * ``skew``: skewness of the vertical mass profile ``sum_cols alpha`` (0 for the symmetric
          disk and square, about -0.53 for the apex-up triangle).
        """
        c = self.cfg
        x = videos.detach().to(torch.float32).cpu().nan_to_num(0.0, 1.0, -1.0)
        x = (x.clamp(-1.0, 1.0) + 1.0) * 0.5
        b, f = x.shape[:2]
        bg = self._bg.view(1, 1, 3, 1, 1)
        diff = x - bg
        d = (diff[:, :, 0] ** 2 + diff[:, :, 1] ** 2 + diff[:, :, 2] ** 2).sqrt()  # (B, F, H, W)
        strong = d > self.jcfg.strong_frac * self._contrast
        region = F.max_pool2d(strong.to(torch.float32).view(b * f, 1, c.size, c.size), 3, 1, 1)
        region = region.view(b, f, c.size, c.size) > 0
        dmax = d.amax(dim=(-2, -1), keepdim=True)
        top = (strong & (d >= self.jcfg.top_frac * dmax)).to(torch.float32)
        n_top = top.sum(dim=(-2, -1))
        color = (x * top[:, :, None]).sum(dim=(-2, -1)) / n_top.clamp_min(1.0)[..., None]
        color = torch.where((n_top > 0)[..., None], color, self._bg.expand_as(color))
        cdir = color - self._bg
        cn2 = (cdir * cdir).sum(-1).clamp_min(1e-6)
        alpha = (diff * cdir[..., None, None]).sum(2) / cn2[..., None, None]
        alpha = alpha.clamp(0.0, 1.0) * region
        area = alpha.sum(dim=(-2, -1))
        pos = torch.arange(c.size, dtype=torch.float32) + 0.5
        safe = area.clamp_min(1e-6)
        cx = (alpha.sum(-2) * pos).sum(-1) / safe
        cy = (alpha.sum(-1) * pos).sum(-1) / safe
        mid = torch.full_like(cx, c.size / 2)
        present = area > 1e-3
        centroid = torch.stack([torch.where(present, cx, mid), torch.where(present, cy, mid)], -1)
        width = alpha.amax(-2).sum(-1)
        height = alpha.amax(-1).sum(-1)
        fill = area / (width * height).clamp_min(1e-6)
        py = alpha.sum(-1)  # (B, F, H) vertical mass profile
        var_y = (py * (pos - cy[..., None]) ** 2).sum(-1) / safe
        m3_y = (py * (pos - cy[..., None]) ** 3).sum(-1) / safe
        skew = torch.where(present, m3_y / var_y.clamp_min(1e-3) ** 1.5, torch.zeros_like(m3_y))
        return {"d": d, "region": region, "region_size": region.sum(dim=(-2, -1)).to(torch.float32),
                "color": color, "alpha": alpha, "area": area, "present": present, "centroid": centroid,
                "fill": fill, "skew": skew}

    def _score_background(self, st: dict[str, Tensor]) -> Tensor:
        """Clean background: ``1 - mean_f clamp((dirt_f + excess_f) / (HW - allow), 0, 1)``.

        ``dirt_f`` sums, over the pixels outside the dilated foreground region, the dirtiness
        ``clamp((d - dirt_lo) / (dirt_hi - dirt_lo), 0, 1)``; ``excess_f = relu(|region| - allow)``
        counts region pixels beyond what one clean shape needs (``allow`` = calibrated dilated
        area x ``region_slack``), so noise / smear that inflates the region is penalised too."""
        return 1.0 - self._frame_dirt(st).mean(-1)

    def _frame_dirt(self, st: dict[str, Tensor]) -> Tensor:
        """Per-frame dirt ``clamp((dirt_f + excess_f) / (HW - allow), 0, 1)``, ``(B, F)``."""
        j = self.jcfg
        dirt = ((st["d"] - j.dirt_lo) / (j.dirt_hi - j.dirt_lo)).clamp(0.0, 1.0)
        dirt = (dirt * (~st["region"])).sum(dim=(-2, -1))
        excess = (st["region_size"] - self._region_allow).clamp_min(0.0)
        denom = max(self.cfg.size ** 2 - self._region_allow, 1.0)
        return ((dirt + excess) / denom).clamp(0.0, 1.0)

    def _score_consistency(self, st: dict[str, Tensor]) -> Tensor:
        """Temporal consistency: ``exp(-k_area * std_f(area) / mean_f(area)) * exp(-k_color *
        |std_f(color)|)`` (population std over frames; colour std is the norm over RGB)."""
        j = self.jcfg
        area = st["area"]
        rel = area.std(-1, unbiased=False) / area.mean(-1).clamp_min(1e-3)
        cstd = st["color"].std(1, unbiased=False).norm(dim=-1)
        return torch.exp(-j.k_area * rel) * torch.exp(-j.k_color * cstd)

    def _score_smoothness(self, st: dict[str, Tensor]) -> Tensor:
        """Smooth motion: ``presence * exp(-k_accel * accel) * exp(-k_speed * speed_err)``.

        ``presence`` = mean over frames of ``clamp(min(area / lo, hi / area), 0, 1)`` (the shape
        is there, with an area within ``area_slack`` of the calibrated shape areas); ``accel`` =
        mean ``|c[t+1] - 2 c[t] + c[t-1]|`` of the centroid, over ``shape_size``; ``speed_err``
        = ``| |c[F-1] - c[0]| / (F-1) - speed | / speed`` (clips of this world always move at
        ``speed``, so a static or too slow / too fast clip is not smooth world motion)."""
        j, c = self.jcfg, self.cfg
        presence = self._frame_presence(st).mean(-1)
        ctr = st["centroid"]
        if c.frames >= 3:
            acc = (ctr[:, 2:] - 2 * ctr[:, 1:-1] + ctr[:, :-2]).norm(dim=-1).mean(-1) / c.shape_size
        else:
            acc = torch.zeros(ctr.shape[0])
        speed = (ctr[:, -1] - ctr[:, 0]).norm(dim=-1) / (c.frames - 1)
        serr = (speed - c.speed).abs() / c.speed
        return presence * torch.exp(-j.k_accel * acc) * torch.exp(-j.k_speed * serr)

    def _frame_presence(self, st: dict[str, Tensor]) -> Tensor:
        """Per-frame ``clamp(min(area / lo, hi / area), 0, 1)``, ``(B, F)`` (see :meth:`_score_smoothness`)."""
        area = st["area"]
        return torch.minimum(area / self._area_lo, self._area_hi / area.clamp_min(1e-6)).clamp(0.0, 1.0)

    def _score_color(self, st: dict[str, Tensor], target: Tensor) -> Tensor:
        """Colour: 1 if the frame-mean foreground colour is nearest (L2, [0, 1] RGB) to the
        prompt's colour among the world's colours, else 0."""
        dist = torch.cdist(st["color"].mean(1), self._palette)
        return (dist.argmin(-1) == target).to(torch.float32)

    def _score_shape(self, st: dict[str, Tensor], target: Tensor) -> Tensor:
        """Shape: 1 if the frame-median shape features ``(fill, skew)`` (soft fill ratio of the
        bounding box and skewness of the vertical mass profile, see :meth:`_analyse`) are nearest
        (L2) to the calibrated features of the prompt's shape among the world's shapes, else 0.
        (disk ~(0.8, 0), square ~(1, 0), apex-up triangle ~(0.68, -0.53) at the default size.)"""
        feat = torch.stack([st["fill"].median(-1).values, st["skew"].median(-1).values], -1)
        return (torch.cdist(feat, self._shape_protos).argmin(-1) == target).to(torch.float32)

    def _score_direction(self, st: dict[str, Tensor], dirs: Tensor) -> Tensor:
        """Direction: ``clamp((along - |across|) / (travel / 2), 0, 1)`` with the centroid
        displacement first -> last frame split along / across the prompt's direction."""
        disp = st["centroid"][:, -1] - st["centroid"][:, 0]
        along = (disp * dirs).sum(-1)
        across = (disp * torch.stack([-dirs[:, 1], dirs[:, 0]], -1)).sum(-1).abs()
        return ((along - across) / (0.5 * self.travel)).clamp(0.0, 1.0)

    def judge(self, videos: Tensor, specs: Sequence[ClipSpec | str]) -> dict[str, Tensor]:
        """Per-clip scores in [0, 1] (float32 tensors of shape (B,)).

        ``background``, ``consistency``, ``smoothness`` (see the ``_score_*`` docstrings),
        ``quality`` = their mean; ``color``, ``shape``, ``direction``, ``semantic`` = their mean;
        ``total = 0.8 quality + 0.2 semantic``. ``specs`` are :class:`ClipSpec` or prompts."""
        videos = self._check_videos(videos)
        col_t, shp_t, dirs = self._targets(videos, specs)
        st = self._analyse(videos)
        out = {
            "background": self._score_background(st),
            "consistency": self._score_consistency(st),
            "smoothness": self._score_smoothness(st),
            "color": self._score_color(st, col_t),
            "shape": self._score_shape(st, shp_t),
            "direction": self._score_direction(st, dirs),
        }
        out["quality"] = (out["background"] + out["consistency"] + out["smoothness"]) / 3
        out["semantic"] = (out["color"] + out["shape"] + out["direction"]) / 3
        out["total"] = 0.8 * out["quality"] + 0.2 * out["semantic"]
        return out

    def evaluate(self, videos: Tensor, specs: Sequence[ClipSpec | str]) -> dict[str, float]:
        """Batch means of :meth:`judge` as Python floats."""
        return {k: float(v.mean()) for k, v in self.judge(videos, specs).items()}

    def _targets(self, videos: Tensor, specs: Sequence[ClipSpec | str]) -> tuple[Tensor, Tensor, Tensor]:
        """The prompts' colour and shape indices ``(B,)`` and unit directions ``(B, 2)``, checked."""
        specs = [ClipSpec.from_prompt(s) if isinstance(s, str) else s for s in specs]
        if len(specs) != videos.shape[0]:
            raise ValueError(f"got {videos.shape[0]} videos but {len(specs)} specs")
        c = self.cfg
        for s in specs:
            _check_name("color", s.color, c.colors)
            _check_name("shape", s.shape, c.shapes)
            _check_name("direction", s.direction, c.directions)
        col_t = torch.tensor([c.colors.index(s.color) for s in specs], dtype=torch.long)
        shp_t = torch.tensor([c.shapes.index(s.shape) for s in specs], dtype=torch.long)
        dirs = torch.tensor([_DIR_VEC[s.direction] for s in specs], dtype=torch.float32).view(-1, 2)
        return col_t, shp_t, dirs

    # ------------------------------------------------------------------ per-chunk judge
    def judge_chunks(self, videos: Tensor, specs: Sequence[ClipSpec | str],
                     chunk_partition: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Per-chunk scores in [0, 1]: float32 tensors ``(B, K)`` for the ``K`` chunks of
        ``chunk_partition`` (frames per chunk, summing to ``frames``; default the config's
        ``chunk_partition``). Keys: those of :meth:`judge` plus ``drift``. Made to compare late
        chunks with early ones (exposure bias of a chunk-causal generator): a chunk is scored on its
        own frames and the motion into them, so a real clip scores 1 on every chunk and a defect
        lowers the chunks it is in, plus the chunk after it when the defect ends at a chunk's last
        frame (the step into the next chunk starts from a bad frame); a defect of a 1-frame first
        chunk lowers that chunk only. Uniform damage (e.g. noise on every frame) scores the same on
        every chunk: each chunk has the same kinds of terms, so no position is favoured.

        * ``background``: the per-frame clean-background score of :meth:`judge`, mean over the chunk.
        * ``consistency``: appearance against the prompt, per frame ``exp(-k_area relu(|area / A - 1|
          - chunk_area_tol)) * exp(-k_color relu(|colour - C| - chunk_color_tol))``, ``A`` the
          calibrated area of the prompt's shape, ``C`` the prompt's colour; mean over the chunk.
          (An absolute reference: anchored on the first chunk, a defect there would lower every
          later chunk; that relative view is ``drift``.)
        * ``smoothness``: ``presence * exp(-k_speed verr)``: ``presence`` as in :meth:`judge`, over the
          chunk's frames; ``verr`` the mean over the chunk's steps of the distance of the centroid's
          step ``c[f] - c[f-1]`` to the nearest motion of this world (``speed`` px along one of its
          directions; not the prompt's: that is ``direction``), over ``speed``. This replaces the
          clip's acceleration and net-speed terms, which need three frames or the whole clip, by one
          per-step term that every chunk has (static: 0.135 as in :meth:`judge`; a jump, a stall or a
          sideways drift show in the steps where they happen). The clip's steps are *partitioned*
          among the chunks: the step ``f-1 -> f`` belongs to the chunk of frame ``f``, so a chunk
          answers for continuing the motion across its start boundary; a 1-frame first chunk has no
          step of its own and takes its neighbour's, the step 0 -> 1, which chunk 1 then does not
          count (a defect of frame 0 shows in chunk 0 only). A chunk left without a step (1-frame
          chunks after a 1-frame first chunk) shares the step into it.
        * ``color`` / ``shape``: the prompt's colour / shape recognised on the chunk's frames (mean
          colour, median shape features; 0 or 1). ``direction``: mean over the chunk's steps of
          ``clamp((along - |across|) / (speed / 2), 0, 1)``, the step split along / across the
          prompt's direction.
        * ``quality``, ``semantic``, ``total``: as in :meth:`judge`.
        * ``drift`` (not in ``quality``): appearance against the clip's *first chunk* (the causal
          model's context), the ``consistency`` formula with ``A``, ``C`` the first chunk's mean
          area and colour; a 1-frame first chunk is scored on frame 1 against frame 0. A first
          chunk of another appearance lowers every later chunk's ``drift``.
        """
        videos = self._check_videos(videos)
        parts = self.cfg.chunk_partition if chunk_partition is None else tuple(chunk_partition)
        if not parts:
            raise ValueError("judge_chunks needs a chunk_partition (or ShapesConfig.chunk_partition)")
        bounds = chunk_bounds(parts, self.cfg.frames)
        specs = [ClipSpec.from_prompt(q) if isinstance(q, str) else q for q in specs]
        col_t, shp_t, dirs = self._targets(videos, specs)
        st = self._analyse(videos)
        j, c = self.jcfg, self.cfg
        nf, b = c.frames, videos.shape[0]
        clean = 1.0 - self._frame_dirt(st)                                   # (B, F)
        presence = self._frame_presence(st)                                  # (B, F)

        def agreement(area_ref: Tensor, color_ref: Tensor) -> Tensor:        # (B, F)
            da = ((st["area"] / area_ref.clamp_min(1e-3) - 1).abs() - j.chunk_area_tol).clamp_min(0.0)
            dc = ((st["color"] - color_ref).norm(dim=-1) - j.chunk_color_tol).clamp_min(0.0)
            return torch.exp(-j.k_area * da) * torch.exp(-j.k_color * dc)

        ref_area = torch.tensor([self.ref_area[q.shape] for q in specs], dtype=torch.float32).view(b, 1)
        consistency = agreement(ref_area, self._palette[col_t].view(b, 1, 3))
        s0, e0 = bounds[0]
        lone = e0 - s0 == 1
        drift = agreement(st["area"][:, s0:e0].mean(-1, keepdim=True), st["color"][:, s0:e0].mean(1, keepdim=True))

        chunk_of = [k for k, (s, e) in enumerate(bounds) for _ in range(s, e)]
        step_owner = {f: chunk_of[f] for f in range(1, nf)}                   # step f-1 -> f
        if lone:
            step_owner[1] = 0                                                 # the step 0 -> 1
        ctr = st["centroid"]                                                  # (B, F, 2)
        world_vel = c.speed * torch.tensor([_DIR_VEC[d] for d in c.directions], dtype=torch.float32)  # (D, 2)
        perp = torch.stack([-dirs[:, 1], dirs[:, 0]], -1)
        out: dict[str, list[Tensor]] = {k: [] for k in ("background", "consistency", "smoothness", "color",
                                                         "shape", "direction", "drift")}
        for k, (s, e) in enumerate(bounds):
            out["background"].append(clean[:, s:e].mean(-1))
            out["consistency"].append(consistency[:, s:e].mean(-1))
            out["drift"].append(drift[:, 1] if k == 0 and lone else drift[:, s:e].mean(-1))
            steps = torch.tensor([f for f, o in step_owner.items() if o == k] or [max(s, 1)])
            vel = ctr[:, steps] - ctr[:, steps - 1]                           # (B, n, 2)
            verr = (vel[:, :, None] - world_vel).norm(dim=-1).amin(-1) / c.speed   # nearest world motion
            out["smoothness"].append(presence[:, s:e].mean(-1) * torch.exp(-j.k_speed * verr.mean(-1)))
            along = (vel * dirs[:, None]).sum(-1)
            across = (vel * perp[:, None]).sum(-1).abs()
            out["direction"].append(((along - across) / (0.5 * c.speed)).clamp(0.0, 1.0).mean(-1))
            dist = torch.cdist(st["color"][:, s:e].mean(1), self._palette)
            out["color"].append((dist.argmin(-1) == col_t).to(torch.float32))
            feat = torch.stack([st["fill"][:, s:e].median(-1).values, st["skew"][:, s:e].median(-1).values], -1)
            out["shape"].append((torch.cdist(feat, self._shape_protos).argmin(-1) == shp_t).to(torch.float32))
        res = {key: torch.stack(v, -1) for key, v in out.items()}
        res["quality"] = (res["background"] + res["consistency"] + res["smoothness"]) / 3
        res["semantic"] = (res["color"] + res["shape"] + res["direction"]) / 3
        res["total"] = 0.8 * res["quality"] + 0.2 * res["semantic"]
        return res

    def evaluate_chunks(self, videos: Tensor, specs: Sequence[ClipSpec | str],
                        chunk_partition: Sequence[int] | None = None) -> dict[str, list[float]]:
        """Batch means of :meth:`judge_chunks`: one Python float per chunk for every key."""
        return {k: [float(x) for x in v.mean(0)] for k, v in self.judge_chunks(videos, specs, chunk_partition).items()}


# ----------------------------------------------------------------------------------------------
# text embedder
# ----------------------------------------------------------------------------------------------


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

    def lengths(self, prompts: Sequence[str]) -> Tensor:
        """Number of (non-padding) tokens per prompt, ``(B,)`` long."""
        return torch.tensor([min(len(self.tokenize(p)), self.max_tokens) for p in prompts], dtype=torch.long)

    def __call__(self, prompts: Sequence[str] | str) -> Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for b, p in enumerate(prompts):
            toks = self.tokenize(p)[: self.max_tokens]
            for i, w in enumerate(toks):
                out[b, i] = self.word_vector(w) + self.pos_code[i]
        return out
