"""Tests of the causal shapes world (longer clips for the chunk-causal / FAR path) and its per-chunk judge."""

from __future__ import annotations

import pytest
import torch

from anystep.causal import chunk_bounds
from anystep.config import resolve
from anystep.worlds.shapes import (
    CAUSAL_PARTITION,
    ClipSpec,
    ShapesJudge,
    ShapesWorld,
    causal_config,
)

DIR_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
KEYS = {"background", "consistency", "smoothness", "color", "shape", "direction", "quality", "semantic", "total",
        "drift"}


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(causal_config())


@pytest.fixture(scope="module")
def judge(world) -> ShapesJudge:
    return ShapesJudge(world)


@pytest.fixture(scope="module")
def batch(world):
    return world.sample(64, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lane_specs(world) -> list[ClipSpec]:
    """Clips moving along x or y near the middle of the frame, so a sideways detour of up to 2.4 px stays in it."""
    specs = world.sample_specs(24, 3)
    out = []
    for s in specs:
        if s.direction in ("left", "right"):
            out.append(ClipSpec(s.color, s.shape, s.direction, s.x0, 8.0))
        else:
            out.append(ClipSpec(s.color, s.shape, s.direction, 8.0, s.y0))
    return out


def render_path(world: ShapesWorld, specs: list[ClipSpec], offsets: torch.Tensor) -> torch.Tensor:
    """Clips whose shape sits at its straight-line position plus ``offsets`` (B, F, 2) in every frame."""
    nf = world.cfg.frames
    shifted = [ClipSpec(s.color, s.shape, s.direction, s.x0 + float(offsets[i, f, 0]), s.y0 + float(offsets[i, f, 1]))
               for i, s in enumerate(specs) for f in range(nf)]
    frames = world.render(shifted).view(len(specs), nf, *world.shape)
    return torch.stack([frames[:, f, f] for f in range(nf)], 1)


def recolour(world: ShapesWorld, videos: torch.Tensor, specs: list[ClipSpec], frames: slice) -> torch.Tensor:
    out = videos.clone()
    other = [ClipSpec("blue" if s.color != "blue" else "red", s.shape, s.direction, s.x0, s.y0) for s in specs]
    out[:, frames] = world.render(other)[:, frames]
    return out


def perp(specs: list[ClipSpec]) -> torch.Tensor:
    d = torch.tensor([DIR_VEC[s.direction] for s in specs])
    return torch.stack([-d[:, 1], d[:, 0]], -1)


# ----------------------------------------------------------------------------------- the causal world


def test_causal_config_and_partition():
    cfg = causal_config()
    assert (cfg.size, cfg.frames, cfg.shape_size, cfg.speed) == (16, 9, 5.0, 1.0)
    assert CAUSAL_PARTITION == (1, 2, 2, 2, 2)
    assert cfg.shape_size + cfg.speed * (cfg.frames - 1) <= cfg.size
    assert causal_config(colors=("red", "blue")).colors == ("red", "blue")
    assert chunk_bounds(CAUSAL_PARTITION, 9) == [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9)]
    assert chunk_bounds([9], 9) == [(0, 9)]
    for bad in ([1, 2, 2], [0, 9], [], [1.5, 7.5], [True, 8]):
        with pytest.raises(ValueError, match="partition"):
            chunk_bounds(bad, 9)


def test_far_teacher_preset_resolves():
    cfg = resolve("shapes_far_teacher")
    teacher = resolve("shapes_teacher")
    assert cfg.kind == "teacher" and cfg.model.init == "shipped:shapes_teacher"
    assert cfg.world.shapes == causal_config()
    assert cfg.model.network is None and teacher.model.network is not None   # the network is model.init's


def test_judge_references_on_nine_frames(world, judge, batch):
    videos, specs = batch
    g = torch.Generator().manual_seed(1)
    real = judge.evaluate(videos, specs)
    small = judge.evaluate(videos + 0.03 * torch.randn(videos.shape, generator=g), specs)
    noisy = judge.evaluate(videos + 0.2 * torch.randn(videos.shape, generator=g), specs)
    blur = judge.evaluate(world.mean_videos(specs, 32, g), specs)
    static = judge.evaluate(videos[:, :1].expand_as(videos), specs)
    pure = judge.evaluate(torch.randn(videos.shape, generator=g), specs)
    assert real["total"] >= 0.99 and small["total"] >= 0.95
    for bad in (noisy, blur, static, pure):
        assert bad["total"] < real["total"] - 0.2
    assert static["direction"] < 0.01 and pure["total"] < min(noisy["total"], blur["total"], static["total"])


# ----------------------------------------------------------------------------------- per-chunk judge


def test_judge_chunks_api(judge, batch):
    videos, specs = batch
    r = judge.judge_chunks(videos, specs, CAUSAL_PARTITION)
    assert set(r) == KEYS
    for k, v in r.items():
        assert v.shape == (64, 5) and v.dtype == torch.float32, k
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0, k
    torch.testing.assert_close(r["total"], 0.8 * r["quality"] + 0.2 * r["semantic"])
    # prompts work as specs; evaluate_chunks gives the per-chunk means
    explicit = judge.judge_chunks(videos, [s.prompt() for s in specs], [1, 2, 2, 2, 2])
    assert all(torch.equal(r[k], explicit[k]) for k in KEYS)
    e = judge.evaluate_chunks(videos, specs, [3, 3, 3])
    assert len(e["total"]) == 3 and e["total"][0] == pytest.approx(1.0)
    assert judge.judge_chunks(videos, specs, [9])["total"].shape == (64, 1)
    with pytest.raises(ValueError, match="partition"):
        judge.judge_chunks(videos, specs, [2, 2, 2])
    with pytest.raises(ValueError, match=r"\(B, 9, 3, 16, 16\)"):
        judge.judge_chunks(videos[:, :4], specs, CAUSAL_PARTITION)
    with pytest.raises(ValueError, match="specs"):
        judge.judge_chunks(videos[:3], specs[:2], CAUSAL_PARTITION)


def test_real_clips_score_one_on_every_chunk(world, judge, batch):
    videos, specs = batch
    r = judge.judge_chunks(videos, specs, CAUSAL_PARTITION)
    for k, v in r.items():
        assert float(v.min()) >= 0.999, k
    v, s = world.sample(16, 99)
    assert float(judge.judge_chunks(v, s, CAUSAL_PARTITION)["total"].min()) >= 0.999


def test_uniform_damage_favours_no_chunk(judge, batch):
    """Noise on every frame, pure noise, a static clip: every chunk scores about the same."""
    videos, specs = batch
    g = torch.Generator().manual_seed(2)
    for bad in (videos + 0.2 * torch.randn(videos.shape, generator=g), torch.randn(videos.shape, generator=g),
                videos[:, :1].expand_as(videos)):
        m = torch.tensor(judge.evaluate_chunks(bad, specs, CAUSAL_PARTITION)["total"])
        assert float(m.max() - m.min()) < 0.04, m
        assert float(m.max()) < 0.85


def _changed(judge, clean, bad, specs):
    ref = judge.judge_chunks(clean, specs, CAUSAL_PARTITION)
    got = judge.judge_chunks(bad, specs, CAUSAL_PARTITION)
    return ref, got


@pytest.mark.parametrize("corruption", ["noise", "detour", "colour", "stall"])
def test_late_corruption_lowers_exactly_the_late_chunks(world, judge, lane_specs, corruption):
    specs = lane_specs
    clean = world.render(specs)
    late = slice(5, 9)                                 # chunks 3 and 4
    if corruption == "noise":
        bad = clean.clone()
        bad[:, late] += 0.2 * torch.randn(bad[:, late].shape, generator=torch.Generator().manual_seed(3))
    elif corruption == "detour":                       # drifts sideways off the straight path from frame 5 on
        off = torch.zeros(len(specs), 9, 2)
        for f in range(5, 9):
            off[:, f] = perp(specs) * 0.6 * (f - 4)
        bad = render_path(world, specs, off)
    elif corruption == "colour":
        bad = recolour(world, clean, specs, late)
    else:                                              # stops moving at frame 4
        bad = clean.clone()
        bad[:, late] = clean[:, 4:5]
    ref, got = _changed(judge, clean, bad, specs)
    for k in KEYS:
        torch.testing.assert_close(got[k][:, :3], ref[k][:, :3], msg=lambda m, k=k: f"{k}: {m}")
    drop = (ref["total"] - got["total"])[:, 3:].mean(0)
    assert float(drop.min()) > 0.05, drop
    expect = {"noise": "background", "detour": "smoothness", "colour": "consistency", "stall": "smoothness"}
    assert float((ref[expect[corruption]] - got[expect[corruption]])[:, 3:].mean()) > 0.1


@pytest.mark.parametrize("corruption", ["noise", "colour", "displaced"])
def test_first_chunk_corruption_lowers_only_the_first_chunk(world, judge, lane_specs, corruption):
    specs = lane_specs
    clean = world.render(specs)
    if corruption == "noise":
        bad = clean.clone()
        bad[:, :1] += 0.2 * torch.randn(bad[:, :1].shape, generator=torch.Generator().manual_seed(4))
    elif corruption == "colour":
        bad = recolour(world, clean, specs, slice(0, 1))
    else:                                              # frame 0 is 1.5 px off the path
        off = torch.zeros(len(specs), 9, 2)
        off[:, 0] = perp(specs) * 1.5
        bad = render_path(world, specs, off)
    ref, got = _changed(judge, clean, bad, specs)
    for k in KEYS - {"drift"}:
        torch.testing.assert_close(got[k][:, 1:], ref[k][:, 1:], msg=lambda m, k=k: f"{k}: {m}")
    assert float((ref["total"] - got["total"])[:, 0].mean()) > 0.1
    if corruption == "colour":                         # every later chunk disagrees with the context
        assert float(got["drift"][:, 1:].max()) < 0.1
    else:
        assert float(got["drift"][:, 2:].min()) > 0.5


def test_boundary_jump_is_charged_to_the_later_chunk(world, judge, lane_specs):
    """A jump of the shape at the start of chunk 3 (between frames 4 and 5) lowers chunk 3's motion only."""
    specs = lane_specs
    off = torch.zeros(len(specs), 9, 2)
    off[:, 5:] = perp(specs)[:, None] * 1.5             # the shape jumps 1.5 px sideways, then goes on straight
    clean, bad = world.render(specs), render_path(world, specs, off)
    ref, got = _changed(judge, clean, bad, specs)
    d = (ref["smoothness"] - got["smoothness"]).mean(0)
    assert float(d[3]) > 0.2
    assert float(d[[0, 1, 2, 4]].abs().max()) < 0.05, d
