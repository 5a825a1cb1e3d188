"""The shapes world's exact judge, VBench in spirit: scores in [0, 1] of whole clips
(:meth:`ShapesJudge.judge`) and of the chunks of a chunk partition (:meth:`ShapesJudge.judge_chunks`, the
FAR / chunk-causal path: does quality fall in late chunks?).

Quality (clean background, temporal consistency, smooth motion) and Semantic (colour, shape, direction right)
sub-scores, ``quality`` and ``semantic`` their means, ``total = 0.8 quality + 0.2 semantic``. Both judges read
the same per-frame statistics (:meth:`ShapesJudge._analyse`, measured against the statistics of clean renders
that :meth:`ShapesJudge._calibrate` records) and share one scorer wherever they score the same thing:

* ``_frame_dirt`` (per frame): ``background`` of the clip (mean over the clip) and of a chunk (its frames);
* ``_frame_presence`` (per frame): the presence factor of ``smoothness``, clip and chunk;
* ``_color_recognised`` / ``_shape_recognised`` (over a set of frames): ``color`` / ``shape``, clip and chunk;
* ``_direction_agreement`` (per displacement): ``direction``, of the clip's first -> last frame displacement
  and of each of a chunk's centroid steps;
* ``_with_totals``: ``quality``, ``semantic`` and ``total`` from the six sub-scores, clip and chunk;
* clip only: ``_score_consistency`` (temporal spread of area and colour) and the acceleration and net-speed
  terms of ``_score_smoothness``, which need three frames or the whole clip;
* chunk only: ``_frame_agreement`` (per frame, appearance against a reference: ``consistency``, ``drift``),
  ``_motion_error`` (per step, distance to the world's motions: ``smoothness``), ``_chunk_steps`` (which steps
  a chunk answers for).

Runs on the CPU (a CPU component by contract: samples are judged as CPU copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...causal import chunk_bounds
from .scene import (
    BACKGROUNDS,
    COLORS,
    DIRECTION_VECTORS,
    ClipSpec,
    ShapesConfig,
    ShapesWorld,
    check_name,
)

__all__ = ["JudgeConfig", "ShapesJudge"]


@dataclass(frozen=True)
class JudgeConfig:
    """Constants of :class:`ShapesJudge` (colour distances in [0, 1] RGB, lengths in pixels).

    ``strong_frac``: a pixel is *strong foreground* when its distance to the background colour
    exceeds ``strong_frac * min_k |colour_k - background|``. ``top_frac``: the frame's
    foreground colour is the mean of the strong pixels within ``top_frac`` of the largest
    distance. ``dirt_range`` = (lo, hi): a background-region pixel at distance ``d`` is
    ``clamp((d - lo) / (hi - lo), 0, 1)`` dirty (tolerates ~0.04 per-channel bias in [-1, 1]
    units and noise of std ~0.03; noise of std 0.2 makes about half the background dirty).
    ``region_slack``: the dilated foreground region may be this many times the calibrated
    clean-shape region before the excess counts as dirt. ``area_slack``: the foreground area
    must lie in ``[min_area / slack, max_area * slack]`` of the calibrated shape areas.
    ``k_*``: decay rates of the exponential penalties (see the ``_score_*``, ``_frame_agreement`` and
    :meth:`ShapesJudge.judge_chunks` docstrings).
    ``chunk_tol`` = (area, colour): deviations of a frame's relative area / colour from its
    reference that :meth:`ShapesJudge.judge_chunks` forgives (clean renders vary up to ~2% in
    estimated area and ~0.025 in estimated colour with the sub-pixel position).
    """

    strong_frac: float = 0.5
    top_frac: float = 0.95
    dirt_range: tuple[float, float] = (0.06, 0.14)
    region_slack: float = 1.5
    area_slack: float = 1.5
    k_area: float = 4.0
    k_color: float = 4.0
    chunk_tol: tuple[float, float] = (0.05, 0.05)   # (relative area, colour), the per-chunk judge's
    k_accel: float = 4.0
    k_speed: float = 2.0


def _direction_agreement(disp: Tensor, dirs: Tensor, length: float) -> Tensor:
    """``clamp((along - |across|) / (length / 2), 0, 1)``: the displacements ``disp`` (..., 2) split along /
    across the unit directions ``dirs`` (broadcast to ``disp``), against the expected length ``length``."""
    along = (disp * dirs).sum(-1)
    across = (disp * torch.stack([-dirs[..., 1], dirs[..., 0]], -1)).sum(-1).abs()
    return ((along - across) / (0.5 * length)).clamp(0.0, 1.0)


def _chunk_steps(bounds: Sequence[tuple[int, int]]) -> list[Tensor]:
    """The centroid steps each chunk of ``bounds`` answers for: one long tensor per chunk of frames ``f``,
    each standing for the step ``f-1 -> f``.

    The clip's steps are *partitioned* among the chunks: the step ``f-1 -> f`` belongs to the chunk of
    frame ``f``, so a chunk answers for continuing the motion across its start boundary; a 1-frame first
    chunk has no step of its own and takes its neighbour's, the step 0 -> 1, which chunk 1 then does not
    count (a defect of frame 0 shows in chunk 0 only). A chunk left without a step (1-frame chunks after a
    1-frame first chunk) shares the step into it."""
    nf = bounds[-1][1]
    chunk_of = [k for k, (s, e) in enumerate(bounds) for _ in range(s, e)]
    step_owner = {f: chunk_of[f] for f in range(1, nf)}                   # step f-1 -> f
    if bounds[0][1] - bounds[0][0] == 1:
        step_owner[1] = 0                                                 # the step 0 -> 1
    return [torch.tensor([f for f, o in step_owner.items() if o == k] or [max(s, 1)])
            for k, (s, e) in enumerate(bounds)]


def _with_totals(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adds ``quality`` = mean of background, consistency and smoothness, ``semantic`` = mean of colour,
    shape and direction, ``total = 0.8 quality + 0.2 semantic`` (per clip or per chunk alike)."""
    scores["quality"] = (scores["background"] + scores["consistency"] + scores["smoothness"]) / 3
    scores["semantic"] = (scores["color"] + scores["shape"] + scores["direction"]) / 3
    scores["total"] = 0.8 * scores["quality"] + 0.2 * scores["semantic"]
    return scores


class ShapesJudge:
    """The exact judge of a :class:`ShapesWorld` (or of the world of a :class:`ShapesConfig`; default: the
    default world), calibrated on that world's clean renders (see the module docstring)."""

    def __init__(self, world: ShapesWorld | ShapesConfig | None = None, cfg: JudgeConfig | None = None):
        self.world = world if isinstance(world, ShapesWorld) else ShapesWorld(world)
        self.cfg = cfg if cfg is not None else JudgeConfig()
        c = self.world.cfg
        self._bg = torch.tensor(BACKGROUNDS[c.background], dtype=torch.float32)
        self._palette = torch.tensor([COLORS[n] for n in c.colors], dtype=torch.float32)
        self._contrast = float((self._palette - self._bg).norm(dim=-1).min())
        self._world_vel = c.speed * torch.tensor([DIRECTION_VECTORS[d] for d in c.directions],
                                                 dtype=torch.float32)  # (D, 2): the world's motions per frame
        self._calibrate()

    # ------------------------------------------------------------------ calibration and analysis
    def _calibrate(self) -> None:
        """Measure reference statistics of clean renders (area, dilated-region size and fill
        ratio per shape) with a fixed internal seed; the judge's thresholds derive from them."""
        g = torch.Generator().manual_seed(12345)
        w, c = self.world, self.world.cfg
        area: dict[str, float] = {}
        region: dict[str, float] = {}
        fill: dict[str, tuple[float, float]] = {}
        for shp in c.shapes:
            specs = [ClipSpec(c.colors[0], shp, s.direction, s.x0, s.y0) for s in w.sample_specs(32, g)]
            st = self._analyse(w.render(specs))
            area[shp] = float(st["area"].mean())
            region[shp] = float(st["region_size"].mean())
            fill[shp] = (float(st["fill"].median()), float(st["skew"].median()))
        self.ref_area, self.ref_shape_features = area, fill
        self._area_protos = torch.tensor([area[s] for s in c.shapes], dtype=torch.float32)  # (S,)
        self._shape_protos = torch.tensor([fill[s] for s in c.shapes])  # (S, 2)
        self._area_lo = min(area.values()) / self.cfg.area_slack
        self._area_hi = max(area.values()) * self.cfg.area_slack
        self._region_allow = max(region.values()) * self.cfg.region_slack

    def _check_videos(self, videos: Tensor) -> Tensor:
        shape = self.world.shape
        f, c, h, w = shape
        if not isinstance(videos, Tensor) or videos.dim() != 5 or tuple(videos.shape[1:]) != shape:
            got = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
            raise ValueError(f"expected videos of shape (B, {f}, {c}, {h}, {w}), got {got}")
        if not videos.is_floating_point():
            raise ValueError(f"expected a floating-point video tensor, got {videos.dtype}")
        return videos

    def _targets(self, videos: Tensor, specs: Sequence[ClipSpec | str]) -> tuple[Tensor, Tensor, Tensor]:
        """The prompts' colour and shape indices ``(B,)`` and unit directions ``(B, 2)``, checked."""
        specs = [ClipSpec.from_prompt(s) if isinstance(s, str) else s for s in specs]
        if len(specs) != videos.shape[0]:
            raise ValueError(f"got {videos.shape[0]} videos but {len(specs)} specs")
        c = self.world.cfg
        for s in specs:
            check_name("color", s.color, c.colors)
            check_name("shape", s.shape, c.shapes)
            check_name("direction", s.direction, c.directions)
        col_t = torch.tensor([c.colors.index(s.color) for s in specs], dtype=torch.long)
        shp_t = torch.tensor([c.shapes.index(s.shape) for s in specs], dtype=torch.long)
        dirs = torch.tensor([DIRECTION_VECTORS[s.direction] for s in specs], dtype=torch.float32).view(-1, 2)
        return col_t, shp_t, dirs

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
        size = self.world.cfg.size
        x = videos.detach().to(torch.float32).cpu().nan_to_num(0.0, 1.0, -1.0)
        x = (x.clamp(-1.0, 1.0) + 1.0) * 0.5
        b, f = x.shape[:2]
        diff = x - self._bg.view(1, 1, 3, 1, 1)
        d = (diff[:, :, 0] ** 2 + diff[:, :, 1] ** 2 + diff[:, :, 2] ** 2).sqrt()  # (B, F, H, W)
        strong = d > self.cfg.strong_frac * self._contrast
        region = F.max_pool2d(strong.to(torch.float32).view(b * f, 1, size, size), 3, 1, 1)
        region = region.view(b, f, size, size) > 0
        dmax = d.amax(dim=(-2, -1), keepdim=True)
        top = (strong & (d >= self.cfg.top_frac * dmax)).to(torch.float32)
        n_top = top.sum(dim=(-2, -1))
        color = (x * top[:, :, None]).sum(dim=(-2, -1)) / n_top.clamp_min(1.0)[..., None]
        color = torch.where((n_top > 0)[..., None], color, self._bg.expand_as(color))
        cdir = color - self._bg
        cn2 = (cdir * cdir).sum(-1).clamp_min(1e-6)
        alpha = (diff * cdir[..., None, None]).sum(2) / cn2[..., None, None]
        alpha = alpha.clamp(0.0, 1.0) * region
        area = alpha.sum(dim=(-2, -1))
        pos = torch.arange(size, dtype=torch.float32) + 0.5
        safe = area.clamp_min(1e-6)
        cx = (alpha.sum(-2) * pos).sum(-1) / safe
        cy = (alpha.sum(-1) * pos).sum(-1) / safe
        mid = torch.full_like(cx, size / 2)
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

    # ------------------------------------------------------------------ scorers shared by both judges
    def _frame_dirt(self, st: dict[str, Tensor]) -> Tensor:
        """Per-frame dirt ``clamp((dirt_f + excess_f) / (HW - allow), 0, 1)``, ``(B, F)`` (see
        :meth:`_score_background`)."""
        j = self.cfg
        lo, hi = j.dirt_range
        dirt = ((st["d"] - lo) / (hi - lo)).clamp(0.0, 1.0)
        dirt = (dirt * (~st["region"])).sum(dim=(-2, -1))
        excess = (st["region_size"] - self._region_allow).clamp_min(0.0)
        denom = max(self.world.cfg.size ** 2 - self._region_allow, 1.0)
        return ((dirt + excess) / denom).clamp(0.0, 1.0)

    def _frame_presence(self, st: dict[str, Tensor]) -> Tensor:
        """Per-frame presence ``clamp(min(area / lo, hi / area), 0, 1)``, ``(B, F)`` (see
        :meth:`_score_smoothness`)."""
        area = st["area"]
        return torch.minimum(area / self._area_lo, self._area_hi / area.clamp_min(1e-6)).clamp(0.0, 1.0)

    def _color_recognised(self, st: dict[str, Tensor], target: Tensor, frames: slice = slice(None)) -> Tensor:
        """Colour: 1 if the mean foreground colour over ``frames`` (default all) is nearest (L2, [0, 1]
        RGB) to the prompt's colour among the world's colours, else 0; ``(B,)``."""
        dist = torch.cdist(st["color"][:, frames].mean(1), self._palette)
        return (dist.argmin(-1) == target).to(torch.float32)

    def _shape_recognised(self, st: dict[str, Tensor], target: Tensor, frames: slice = slice(None)) -> Tensor:
        """Shape: 1 if the median over ``frames`` (default all) of the shape features ``(fill, skew)`` (soft
        fill ratio of the bounding box and skewness of the vertical mass profile, see :meth:`_analyse`) is
        nearest (L2) to the calibrated features of the prompt's shape among the world's shapes, else 0;
        ``(B,)``. (disk ~(0.8, 0), square ~(1, 0), apex-up triangle ~(0.68, -0.53) at the default size.)"""
        fill, skew = st["fill"][:, frames], st["skew"][:, frames]
        feat = torch.stack([fill.median(-1).values, skew.median(-1).values], -1)
        return (torch.cdist(feat, self._shape_protos).argmin(-1) == target).to(torch.float32)

    # ------------------------------------------------------------------ the clip judge
    def judge(self, videos: Tensor, specs: Sequence[ClipSpec | str]) -> dict[str, Tensor]:
        """Per-clip scores in [0, 1] (float32 tensors of shape (B,)).

        ``background``, ``consistency``, ``smoothness`` (see the ``_score_*`` docstrings),
        ``quality`` = their mean; ``color``, ``shape``, ``direction``, ``semantic`` = their mean;
        ``total = 0.8 quality + 0.2 semantic``. ``specs`` are :class:`ClipSpec` or prompts."""
        videos = self._check_videos(videos)
        col_t, shp_t, dirs = self._targets(videos, specs)
        st = self._analyse(videos)
        return _with_totals({
            "background": self._score_background(st),
            "consistency": self._score_consistency(st),
            "smoothness": self._score_smoothness(st),
            "color": self._color_recognised(st, col_t),
            "shape": self._shape_recognised(st, shp_t),
            "direction": self._score_direction(st, dirs),
        })

    # ------------------------------------------------------------------ as a sweep's judge
    primary_metric, higher_is_better, picture, picture_samples = "total", True, "video", 4

    def score(self, samples: Tensor, ev, guidance: float = 1.0,
              chunk_partition: Sequence[int] | None = None) -> dict[str, float]:
        """The clip scores of ``samples`` (clamped to the data range) for the evaluation set's clip specs; with
        a causal student's ``chunk_partition`` of 4 or more chunks also the Quality of the first two and of the
        last two chunks and their gap (exposure bias shows as late chunks scoring below early ones)."""
        samples = samples.clamp(-1, 1)
        out = self.evaluate(samples, ev.meta)
        if chunk_partition and len(chunk_partition) >= 4:
            quality = self.judge_chunks(samples, ev.meta, chunk_partition)["quality"].mean(0)   # (K,)
            out["early_quality"] = float(quality[:2].mean())
            out["late_quality"] = float(quality[-2:].mean())
            out["late_gap"] = out["early_quality"] - out["late_quality"]
        return out

    def labels(self, ev) -> list[str]:
        return [spec.prompt() for spec in ev.meta]

    def marks(self) -> Tensor:
        return torch.zeros(0, 2, device="cpu")

    def evaluate(self, videos: Tensor, specs: Sequence[ClipSpec | str]) -> dict[str, float]:
        """Batch means of :meth:`judge` as Python floats."""
        return {k: float(v.mean()) for k, v in self.judge(videos, specs).items()}

    def _score_background(self, st: dict[str, Tensor]) -> Tensor:
        """Clean background: ``1 - mean_f clamp((dirt_f + excess_f) / (HW - allow), 0, 1)``.

        ``dirt_f`` sums, over the pixels outside the dilated foreground region, the dirtiness
        ``clamp((d - lo) / (hi - lo), 0, 1)`` (``dirt_range``); ``excess_f = relu(|region| - allow)``
        counts region pixels beyond what one clean shape needs (``allow`` = calibrated dilated
        area x ``region_slack``), so noise / smear that inflates the region is penalised too."""
        return 1.0 - self._frame_dirt(st).mean(-1)

    def _score_consistency(self, st: dict[str, Tensor]) -> Tensor:
        """Temporal consistency: ``exp(-k_area * std_f(area) / mean_f(area)) * exp(-k_color *
        |std_f(color)|)`` (population std over frames; colour std is the norm over RGB)."""
        j = self.cfg
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
        j, c = self.cfg, self.world.cfg
        presence = self._frame_presence(st).mean(-1)
        ctr = st["centroid"]
        if c.frames >= 3:
            acc = (ctr[:, 2:] - 2 * ctr[:, 1:-1] + ctr[:, :-2]).norm(dim=-1).mean(-1) / c.shape_size
        else:
            acc = torch.zeros(ctr.shape[0])
        speed = (ctr[:, -1] - ctr[:, 0]).norm(dim=-1) / (c.frames - 1)
        serr = (speed - c.speed).abs() / c.speed
        return presence * torch.exp(-j.k_accel * acc) * torch.exp(-j.k_speed * serr)

    def _score_direction(self, st: dict[str, Tensor], dirs: Tensor) -> Tensor:
        """Direction: ``clamp((along - |across|) / (travel / 2), 0, 1)`` with the centroid
        displacement first -> last frame split along / across the prompt's direction."""
        disp = st["centroid"][:, -1] - st["centroid"][:, 0]
        return _direction_agreement(disp, dirs, self.world.travel)

    # ------------------------------------------------------------------ the chunk judge
    def judge_chunks(self, videos: Tensor, specs: Sequence[ClipSpec | str],
                     chunk_partition: Sequence[int]) -> dict[str, Tensor]:
        """Per-chunk scores in [0, 1]: float32 tensors ``(B, K)`` for the ``K`` chunks of
        ``chunk_partition`` (frames per chunk, summing to ``frames``: the causal student's). Keys: those of :meth:`judge` plus ``drift``. Made to compare late
        chunks with early ones (exposure bias of a chunk-causal generator): a chunk is scored on its
        own frames and the motion into them, so a real clip scores 1 on every chunk and a defect
        lowers the chunks it is in, plus the chunk after it when the defect ends at a chunk's last
        frame (the step into the next chunk starts from a bad frame); a defect of a 1-frame first
        chunk lowers that chunk only. Uniform damage (e.g. noise on every frame) scores the same on
        every chunk: each chunk has the same kinds of terms, so no position is favoured.

        * ``background``: the per-frame clean-background score of :meth:`judge`, mean over the chunk.
        * ``consistency``: appearance against the prompt (:meth:`_frame_agreement` with ``A`` the
          calibrated area of the prompt's shape, ``C`` the prompt's colour), mean over the chunk.
          (An absolute reference: anchored on the first chunk, a defect there would lower every
          later chunk; that relative view is ``drift``.)
        * ``smoothness``: ``presence * exp(-k_speed verr)``: ``presence`` as in :meth:`judge`, over the
          chunk's frames; ``verr`` the mean over the chunk's steps (:func:`_chunk_steps`) of
          :meth:`_motion_error`. This replaces the clip's acceleration and net-speed terms, which need
          three frames or the whole clip, by one per-step term that every chunk has (static: 0.135 as in
          :meth:`judge`; a jump, a stall or a sideways drift show in the steps where they happen).
        * ``color`` / ``shape``: the prompt's colour / shape recognised on the chunk's frames (mean
          colour, median shape features; 0 or 1). ``direction``: mean over the chunk's steps of
          ``clamp((along - |across|) / (speed / 2), 0, 1)``, the step split along / across the
          prompt's direction.
        * ``quality``, ``semantic``, ``total``: as in :meth:`judge`.
        * ``drift`` (not in ``quality``): appearance against the clip's first chunk, see :meth:`_drift`.
        """
        videos = self._check_videos(videos)
        parts = tuple(chunk_partition)
        bounds = chunk_bounds(parts, self.world.cfg.frames)
        col_t, shp_t, dirs = self._targets(videos, specs)
        st = self._analyse(videos)
        b = videos.shape[0]
        clean = 1.0 - self._frame_dirt(st)                                     # (B, F)
        presence = self._frame_presence(st)                                    # (B, F)
        consistency = self._frame_agreement(st, self._area_protos[shp_t].view(b, 1),
                                            self._palette[col_t].view(b, 1, 3))   # (B, F)
        ctr = st["centroid"]                                                   # (B, F, 2)
        out: dict[str, list[Tensor]] = {k: [] for k in ("background", "consistency", "smoothness", "color",
                                                         "shape", "direction")}
        for (s, e), steps in zip(bounds, _chunk_steps(bounds)):
            vel = ctr[:, steps] - ctr[:, steps - 1]                            # (B, n, 2) the chunk's steps
            verr = self._motion_error(vel).mean(-1)
            out["background"].append(clean[:, s:e].mean(-1))
            out["consistency"].append(consistency[:, s:e].mean(-1))
            out["smoothness"].append(presence[:, s:e].mean(-1) * torch.exp(-self.cfg.k_speed * verr))
            out["color"].append(self._color_recognised(st, col_t, slice(s, e)))
            out["shape"].append(self._shape_recognised(st, shp_t, slice(s, e)))
            out["direction"].append(_direction_agreement(vel, dirs[:, None], self.world.cfg.speed).mean(-1))
        res = {key: torch.stack(v, -1) for key, v in out.items()}
        res["drift"] = self._drift(st, bounds)
        return _with_totals(res)

    def evaluate_chunks(self, videos: Tensor, specs: Sequence[ClipSpec | str],
                        chunk_partition: Sequence[int]) -> dict[str, list[float]]:
        """Batch means of :meth:`judge_chunks`: one Python float per chunk for every key."""
        scores = self.judge_chunks(videos, specs, chunk_partition)
        return {k: [float(x) for x in v.mean(0)] for k, v in scores.items()}

    def _frame_agreement(self, st: dict[str, Tensor], area_ref: Tensor, color_ref: Tensor) -> Tensor:
        """Appearance against a reference, per frame ``(B, F)``: ``exp(-k_area relu(|area / A - 1| -
        area_tol)) * exp(-k_color relu(|colour - C| - colour_tol))`` (``chunk_tol``) with ``A`` = ``area_ref``
        (B, 1) and ``C`` = ``color_ref`` (B, 1, 3)."""
        j = self.cfg
        area_tol, color_tol = j.chunk_tol
        da = ((st["area"] / area_ref.clamp_min(1e-3) - 1).abs() - area_tol).clamp_min(0.0)
        dc = ((st["color"] - color_ref).norm(dim=-1) - color_tol).clamp_min(0.0)
        return torch.exp(-j.k_area * da) * torch.exp(-j.k_color * dc)

    def _motion_error(self, vel: Tensor) -> Tensor:
        """Per step ``(B, n)``: the distance of the centroid's step ``vel`` (B, n, 2) (``c[f] - c[f-1]``) to
        the nearest motion of this world (``speed`` px along one of its directions; not the prompt's: that
        is ``direction``), over ``speed``."""
        return (vel[:, :, None] - self._world_vel).norm(dim=-1).amin(-1) / self.world.cfg.speed

    def _drift(self, st: dict[str, Tensor], bounds: Sequence[tuple[int, int]]) -> Tensor:
        """``drift`` of :meth:`judge_chunks`, ``(B, K)``: appearance against the clip's *first chunk* (the
        causal model's context), the ``consistency`` formula (:meth:`_frame_agreement`) with ``A``, ``C`` the
        first chunk's mean area and colour, mean over each chunk; a 1-frame first chunk is scored on frame 1
        against frame 0. A first chunk of another appearance lowers every later chunk's ``drift``."""
        s0, e0 = bounds[0]
        agree = self._frame_agreement(st, st["area"][:, s0:e0].mean(-1, keepdim=True),
                                      st["color"][:, s0:e0].mean(1, keepdim=True))   # (B, F)
        lone = e0 - s0 == 1
        return torch.stack([agree[:, 1] if k == 0 and lone else agree[:, s:e].mean(-1)
                            for k, (s, e) in enumerate(bounds)], -1)
