"""Tests of the shapes toy video world: rendering, prompts, text embedder and the exact judge."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anystep.worlds.shapes import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    ClipSpec,
    ShapesConfig,
    ShapesJudge,
    ShapesWorld,
    TextEmbedder,
)

DIR_VEC = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: one thread is much faster than two contended ones
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ShapesConfig())


@pytest.fixture(scope="module")
def judge(world) -> ShapesJudge:
    return ShapesJudge(world)


@pytest.fixture(scope="module")
def batch(world):
    return world.sample(256, torch.Generator().manual_seed(0))


def coverage(video: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """Independent re-derivation of the shape's coverage (F, H, W) from a black-background clip."""
    col = torch.tensor(COLORS[spec.color]).view(1, 3, 1, 1)
    x = (video + 1) / 2
    return (x * col).sum(1) / (col * col).sum()


def centroid(alpha: torch.Tensor) -> torch.Tensor:
    """(F, 2) alpha-weighted centroid (x, y) in pixel coordinates (pixel centres at i + 0.5)."""
    pos = torch.arange(alpha.shape[-1], dtype=torch.float32) + 0.5
    m = alpha.sum((-2, -1))
    return torch.stack([(alpha.sum(-2) * pos).sum(-1) / m, (alpha.sum(-1) * pos).sum(-1) / m], -1)


def mean_scores(judge, videos, specs):
    return judge.evaluate(videos, specs)


# ----------------------------------------------------------------------------------- rendering


def test_render_shape_range_and_determinism(world):
    v1, s1 = world.sample(16, torch.Generator().manual_seed(7))
    v2, s2 = world.sample(16, torch.Generator().manual_seed(7))
    v3, _ = world.sample(16, torch.Generator().manual_seed(8))
    assert v1.shape == (16, 4, 3, 16, 16) == (16, *world.shape) and v1.dtype == torch.float32
    assert float(v1.min()) >= -1.0 and float(v1.max()) <= 1.0
    assert s1 == s2 and torch.equal(v1, v2) and not torch.equal(v1, v3)
    assert torch.equal(world.render(s1), v1)
    assert world.sample_specs(5, 3) == world.sample_specs(5, torch.Generator().manual_seed(3))


def test_shapes_stay_in_frame(world, batch):
    videos, specs = batch
    h = world.cfg.shape_size / 2
    ctr = world.centers(specs)
    assert float((ctr - h).min()) >= 0.0 and float((ctr + h).max()) <= world.cfg.size
    # nothing is clipped: the rendered area is the full shape area in every frame
    expect = {"disk": torch.pi * h * h, "square": 4 * h * h, "triangle": 2 * h * h}
    for v, s in zip(videos, specs):
        area = coverage(v, s).sum((-2, -1))
        assert torch.allclose(area, torch.full_like(area, expect[s.shape]), rtol=0.02), (s, area)
    # extreme start positions of the valid range still fit
    for d in DIRECTIONS:
        (xl, xh), (yl, yh) = world.position_range(d)
        for x0, y0 in ((xl, yl), (xh, yh), (xl, yh), (xh, yl)):
            s = ClipSpec("red", "square", d, x0, y0)
            area = coverage(world.render([s])[0], s).sum((-2, -1))
            assert torch.allclose(area, torch.full_like(area, 25.0), atol=1e-3)


def test_constant_speed_along_direction(world, batch):
    videos, specs = batch
    for v, s in zip(videos, specs):
        c = centroid(coverage(v, s))
        step = c[1:] - c[:-1]
        want = torch.tensor(DIR_VEC[s.direction]) * world.cfg.speed
        assert torch.allclose(step, want.expand_as(step), atol=0.03), (s, step)


def test_colours_and_background_right(world, batch):
    videos, specs = batch
    for v, s in zip(videos[:64], specs[:64]):
        col = torch.tensor(COLORS[s.color]) * 2 - 1
        flat = v.permute(0, 2, 3, 1).reshape(4, -1, 3)
        d = (flat + 1).norm(dim=-1)
        brightest = flat[torch.arange(4), d.argmax(-1)]  # a fully covered pixel exists in every frame
        assert torch.allclose(brightest, col.expand(4, 3), atol=1e-5)
        # pixels either background or along the segment background -> colour (antialiasing)
        a = coverage(v, s)
        recon = -1 + a[:, None] * (col.view(1, 3, 1, 1) + 1)
        assert torch.allclose(recon, v, atol=1e-5)
        assert float((a == 0).float().mean()) > 0.5  # mostly plain background


def test_config_validation_and_other_sizes():
    with pytest.raises(ValueError, match="does not fit"):
        ShapesConfig(size=16, frames=12)
    with pytest.raises(ValueError, match="unknown color 'purple'"):
        ShapesConfig(colors=("red", "purple"))
    with pytest.raises(ValueError, match="unknown shape"):
        ShapesConfig(shapes=("hexagon",))
    with pytest.raises(ValueError, match="unknown background"):
        ShapesConfig(background="pink")
    w = ShapesWorld(ShapesConfig(size=32, frames=12))
    v, specs = w.sample(24, 0)
    assert v.shape == (24, 12, 3, 32, 32)
    assert ShapesJudge(w).evaluate(v, specs)["total"] > 0.97
    w2 = ShapesWorld(ShapesConfig(colors=("red", "blue"), shapes=("disk",), directions=("left", "up")))
    assert w2.prompts == ["a red disk moving left", "a red disk moving up",
                          "a blue disk moving left", "a blue disk moving up"]
    v2, s2 = w2.sample(8, 1)
    assert all(s.prompt() in w2.prompts for s in s2)
    assert ShapesJudge(w2).evaluate(v2, s2)["total"] > 0.97


# ----------------------------------------------------------------------------------- prompts


def test_prompts_templated_and_unique(world):
    ps = world.prompts
    assert len(ps) == len(COLORS) * len(SHAPES) * len(DIRECTIONS) == len(set(ps))
    assert ps[0] == "a red disk moving left"
    assert ClipSpec("red", "disk", "left", 5, 5).prompt() == "a red disk moving left"
    for i, p in enumerate(ps):
        s = ClipSpec.from_prompt(p)
        assert s.prompt() == p and world.prompt_index(s) == i == world.prompt_index(p)
    specs = world.sample_specs(400, 0)
    assert {s.prompt() for s in specs} == set(ps)
    one = world.sample_specs(10, 0, prompt="a blue triangle moving up")
    assert {s.prompt() for s in one} == {"a blue triangle moving up"} and len({s.x0 for s in one}) == 10
    with pytest.raises(ValueError):
        ClipSpec.from_prompt("a cat")
    with pytest.raises(ValueError, match="unknown color"):
        ClipSpec("purple", "disk", "left")
    with pytest.raises(ValueError, match="unknown direction"):
        ClipSpec("red", "disk", "sideways")


# ----------------------------------------------------------------------------------- text embedder


def test_text_embedder(world):
    e1, e2 = TextEmbedder(), TextEmbedder()
    ps = world.prompts
    a, b = e1(ps), e2(ps)
    assert a.shape == (len(ps), 8, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)  # deterministic across instances
    flat = a.reshape(len(ps), -1)
    dist = torch.cdist(flat, flat) + torch.eye(len(ps)) * 1e9
    assert float(dist.min()) > 1.0  # distinct prompts, distinct embeddings
    assert torch.all(a[:, 5:] == 0)  # 5 words, padding is exactly zero
    assert torch.all(a[:, :5].abs().sum(-1) > 0)
    null = e1(["", "a red disk moving left"])
    assert torch.all(null[0] == 0) and torch.equal(null[1], a[0])
    assert torch.equal(e1("a red disk moving left"), a[:1])
    long = e1(["x " * 20])  # truncated to max_tokens words
    assert long.shape == (1, 8, 32) and torch.all(long.abs().sum(-1) > 0)
    assert not torch.equal(TextEmbedder(seed=1)(ps[:1]), a[:1])
    assert TextEmbedder(dim=7, max_tokens=3)(ps[:2]).shape == (2, 3, 7)
    # same word at the same position -> same vector, regardless of the rest of the prompt
    assert torch.equal(a[0, 1], e1(["a red square moving up"])[0, 1])


# ----------------------------------------------------------------------------------- judge


def test_judge_real_clips_score_one(judge, batch):
    videos, specs = batch
    r = judge.judge(videos, specs)
    keys = {"background", "consistency", "smoothness", "color", "shape", "direction",
            "quality", "semantic", "total"}
    assert set(r) == keys
    for k, val in r.items():
        assert val.shape == (256,) and float(val.min()) >= 0.0 and float(val.max()) <= 1.0, k
    assert float(r["total"].mean()) >= 0.99 and float(r["total"].min()) >= 0.95
    assert float(r["semantic"].min()) == 1.0
    torch.testing.assert_close(r["total"], 0.8 * r["quality"] + 0.2 * r["semantic"])
    # prompts work as specs too
    e = judge.evaluate(videos, [s.prompt() for s in specs])
    assert e["total"] == pytest.approx(float(r["total"].mean()))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_judge_real_clips_any_seed(world, judge, seed):
    v, specs = world.sample(8, seed)
    assert float(judge.judge(v, specs)["total"].min()) >= 0.95


def test_judge_degradation_ordering(world, judge, batch):
    videos, specs = batch
    g = torch.Generator().manual_seed(1)
    real = mean_scores(judge, videos, specs)
    small = mean_scores(judge, videos + 0.03 * torch.randn(videos.shape, generator=g), specs)
    noisy = mean_scores(judge, videos + 0.2 * torch.randn(videos.shape, generator=g), specs)
    blur = mean_scores(judge, world.mean_videos(specs, 64, g), specs)
    static = mean_scores(judge, videos[:, :1].expand_as(videos), specs)
    pure = mean_scores(judge, torch.randn(videos.shape, generator=g), specs)

    assert real["total"] >= 0.99
    assert small["total"] >= 0.95  # small sampling noise barely matters
    for bad in (noisy, blur, static, pure):
        assert bad["total"] < real["total"] - 0.2
        assert bad["quality"] < 0.8
    # the regression-to-the-mean (blurry) video: smeared background, no crisp shape
    assert blur["background"] < 0.8 and blur["smoothness"] < 0.5 and blur["total"] < 0.65
    # noise: dirty background, semantics mostly still right
    assert noisy["background"] < 0.6 and noisy["semantic"] > 0.8
    # static: clean and consistent but not moving
    assert static["background"] > 0.99 and static["direction"] < 0.01 and static["smoothness"] < 0.3
    # pure noise is the worst
    assert pure["total"] < min(blur["total"], noisy["total"], static["total"]) and pure["background"] < 0.05
    assert real["total"] > small["total"] > noisy["total"] > pure["total"]


def test_judge_semantic_catches_wrong_attribute(world, judge):
    base = ClipSpec("red", "disk", "right", 5.0, 8.0)
    v = world.render([base])
    for wrong, key in [(ClipSpec("blue", "disk", "right", 5.0, 8.0), "color"),
                       (ClipSpec("yellow", "disk", "right", 5.0, 8.0), "color"),
                       (ClipSpec("red", "square", "right", 5.0, 8.0), "shape"),
                       (ClipSpec("red", "triangle", "right", 5.0, 8.0), "shape"),
                       (ClipSpec("red", "disk", "left", 5.0, 8.0), "direction"),
                       (ClipSpec("red", "disk", "up", 5.0, 8.0), "direction")]:
        r = judge.judge(v, [wrong])
        assert float(r[key][0]) == 0.0, (wrong, key)
        others = {"color", "shape", "direction"} - {key}
        assert all(float(r[k][0]) == 1.0 for k in others)
        assert float(r["quality"][0]) > 0.99 and float(r["semantic"][0]) == pytest.approx(2 / 3)
    # every shape / colour / direction is recognised as itself and not as any other
    specs = world.sample_specs(96, 5)
    v = world.render(specs)
    for attr, names in (("color", COLORS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        for other in names:
            swapped = [ClipSpec(**{**s.__dict__, attr: other}) for s in specs]
            got = judge.judge(v, swapped)[attr]
            want = torch.tensor([float(getattr(s, attr) == other) for s in specs])
            assert torch.equal(got, want), (attr, other)


def test_judge_is_fast(judge, batch):
    videos, specs = batch
    judge.judge(videos, specs)
    t = time.perf_counter()
    judge.judge(videos, specs)
    assert time.perf_counter() - t < 1.0


def test_judge_bad_input(judge, batch):
    videos, specs = batch
    with pytest.raises(ValueError, match=r"\(B, 4, 3, 16, 16\)"):
        judge.judge(videos[:, :3], specs)
    with pytest.raises(ValueError, match=r"\(B, 4, 3, 16, 16\)"):
        judge.judge(videos[0], specs[:1])
    with pytest.raises(ValueError, match=r"\(B, 4, 3, 16, 16\)"):
        judge.evaluate(videos.permute(0, 2, 1, 3, 4), specs)
    with pytest.raises(ValueError, match="specs"):
        judge.judge(videos[:4], specs[:3])
    with pytest.raises(ValueError, match="unknown color 'purple'"):
        judge.judge(videos[:1], ["a purple disk moving left"])
    j2 = ShapesJudge(ShapesConfig(colors=("red", "green")))  # a judge built from a config
    with pytest.raises(ValueError, match="unknown color 'blue'"):
        j2.judge(videos[:1], [ClipSpec("blue", "disk", "left", 8, 8)])
    # NaNs don't crash and score low
    bad = videos[:4].clone()
    bad[:, :, :, :8] = float("nan")
    r = judge.judge(bad, specs[:4])
    assert torch.isfinite(r["total"]).all() and float(r["total"].max()) < 0.9
