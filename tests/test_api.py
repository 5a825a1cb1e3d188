"""The Python API (``anystep.load`` -> Model -> Samples), ``anystep sample --save`` and readable grid labels.

Samples are checked against the flow-map step written out by hand (x_r = x_t - (t - r)/1000 u, on the shifted
grid tau_i = 1000 k s / (1 + (k - 1) s), s = 1 - i/N) and CFG's u_null + w (u_cond - u_null); scores against the
sweep's rows for the same noises (another code path); saved files against fresh samples, bit for bit.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import anystep
from anystep.cli import main
from anystep.config import resolve
from anystep.errors import UsageError
from anystep.evaluate.media import TITLE_GAP, grid_frames, label_font, text_width, wrap_text, write_video
from anystep.recipes import sweep, train

GMM = ["train.batch_size=16", "train.steps=2", "optim.student.warmup_steps=1", "model.init=null",
       "model.network.hidden=32", "model.network.depth=1"]
SHAPES = ["train.batch_size=2", "train.steps=1", "optim.student.warmup_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs: a gmm Stage-1 student from scratch, shapes and causal shapes Stage-1 students from the shipped
    teachers (a second each on 2 cores)."""
    root = tmp_path_factory.mktemp("runs")
    for name, preset, extra in (("gmm", "gmm_stage1", GMM), ("shapes", "shapes_stage1", SHAPES),
                                ("far", "shapes_far_stage1", SHAPES)):
        train(resolve(preset, [*extra, f"train.out_dir={root / name}"]), progress=False)
    return {name: str(root / name) for name in ("gmm", "shapes", "far")}


def _grid(n: int, k: float = 5.0) -> list[float]:
    """The shifted N-step grid, written out: 1000 k s / (1 + (k - 1) s) at s = 1 - i/N."""
    return [1000 * k * s / (1 + (k - 1) * s) for s in (1 - i / n for i in range(n + 1))]


def _euler(u, noise, cond, n, mean_velocity=True):
    """Flow-map Euler by hand: x <- x - (tau_i - tau_i+1)/1000 u(x, tau_i, r), r = tau_i+1 (flow map) or tau_i."""
    x, taus, b = noise, _grid(n), noise.shape[0]
    for t, r in itertools.pairwise(taus):
        tt, rr = torch.full((b,), t), torch.full((b,), r if mean_velocity else t)
        x = x - (t - r) / 1000 * u(x, tt, rr, cond)
    return x


def test_import_anystep_stays_light_and_exports_the_api():
    code = "import sys, anystep; print('torch' in sys.modules, sorted(anystep.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")   # nothing heavy until a name is used
    for name in ("load", "Model", "Samples", "load_samples", "resolve", "train_run", "sweep", "export_run"):
        assert name in out and getattr(anystep, name).__doc__, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        anystep.nope  # noqa: B018


def test_a_gmm_student_is_a_flow_map_sampled_on_the_shifted_grid(runs):
    model = anystep.load(runs["gmm"])
    assert (model.role, model.sampler, model.causal, model.content) == ("student", "flowmap", False, "latents")
    net = model.network
    x, c = torch.randn(3, *model.world.shape), torch.tensor([0, 1, 2])
    with torch.no_grad():
        u = net(x, torch.full((3,), 700.0), torch.full((3,), 200.0), c)
        assert torch.equal(model(x, 700, 200.0, c), u)                     # numbers become (B,) times
        assert torch.allclose(model.step(x, 700, 200, c), x - 0.5 * u, atol=1e-6)
    for n in (1, 8):
        s = model.sample(steps=n, n=8, seed=3)
        assert s.x.shape == (8, *model.world.shape) and len(s) == 8
        assert torch.allclose(s.x, _euler(net, s.noise, s.cond, n), atol=1e-5), n
        assert s.labels == [f"class {k}" for k in (0, 1, 2, 3, 0, 1, 2, 3)]
        assert s.settings["steps"] == str(n) and s.settings["guidance"] == "1.0"
    again, other = model.sample(steps=8, n=8, seed=3), model.sample(steps=8, n=8, seed=4)
    assert torch.equal(again.x, s.x) and not torch.equal(other.noise, s.noise)
    # your own noise and labels: the labels are the judge's meta, so these samples score too
    mine = model.sample(steps=8, noise=s.noise, cond=s.cond.clone())
    assert torch.equal(mine.x, s.x) and model.score(mine) == model.score(s)


def test_scores_are_the_sweeps_for_the_same_noises(runs, tmp_path):
    model = anystep.load(runs["gmm"])
    seed, n = model.config.sweep.seed, 64
    result = sweep([runs["gmm"]], settings={"steps": (1, 4), "num_samples": n, "teacher": False},
                   out=tmp_path / "sweep", progress=False)
    for row in result.rows:
        score = model.score(model.sample(steps=row["N"], n=n, seed=seed))
        assert score == pytest.approx({k: v for k, v in row.items() if k not in ("sampler", "N")}, rel=1e-9)


def test_the_shipped_teacher_samples_with_cfg_and_prompts():
    model = anystep.load("shipped:shapes_teacher")
    assert (model.role, model.sampler, model.guidance, model.content) == ("teacher", "euler", 3.0, "videos")
    prompts = ["a red disk moving left", "a blue square moving up"]
    s = model.sample(steps=2, n=3, prompts=prompts, seed=1)
    assert s.labels == [prompts[0], prompts[1], prompts[0]]
    null = model.world.null_cond.expand_as(s.cond)

    def cfg(x, t, r, c):   # CFG at scale 3 by hand
        u_c, u_u = model.network(x, t, r, c), model.network(x, t, r, null)
        return u_u + 3.0 * (u_c - u_u)

    with torch.no_grad():
        assert torch.allclose(s.x, _euler(cfg, s.noise, s.cond, 2, mean_velocity=False), atol=1e-4)
    plain = model.sample(steps=2, n=3, prompts=prompts, seed=1, guidance=1.0)
    with torch.no_grad():
        assert torch.allclose(plain.x, _euler(model.network, s.noise, s.cond, 2, mean_velocity=False), atol=1e-4)
    scores = model.score(s)
    assert 0 <= scores["total"] <= 1 and {"quality", "semantic"} <= set(scores)
    with pytest.raises(UsageError, match="prompt"):
        model.sample(steps=1, prompts=["a purple blob moving sideways"])


def test_a_shapes_student_samples_videos_with_its_fused_guidance(runs):
    model = anystep.load(runs["shapes"])
    s = model.sample(steps=1, n=2, seed=0)
    with torch.no_grad():   # N = 1: one jump from t = 1000 to r = 0
        u = model.network(s.noise, torch.full((2,), 1000.0), torch.zeros(2), s.cond)
    assert torch.allclose(s.x, s.noise - u, atol=1e-5)
    assert s.content == "videos" and s.labels == [spec.prompt() for spec in s.meta]


def test_a_causal_student_samples_chunk_by_chunk(runs):
    model = anystep.load(runs["far"])
    assert model.causal and model.network.chunk_partition[0] == 1
    s = model.sample(steps=2, n=2, seed=0)
    # later noise cannot reach earlier frames; the first frame's noise reaches the later ones
    late, early = s.noise.clone(), s.noise.clone()
    late[:, -2:] = torch.randn_like(late[:, -2:])
    early[:, :1] = torch.randn_like(early[:, :1])
    a, b = model.sample(steps=2, noise=late, cond=s.cond), model.sample(steps=2, noise=early, cond=s.cond)
    assert torch.allclose(a.x[:, :-2], s.x[:, :-2], atol=1e-5) and not torch.allclose(a.x[:, -2:], s.x[:, -2:])
    assert not torch.allclose(b.x[:, 1:], s.x[:, 1:], atol=1e-3)
    assert "late_gap" in model.score(s)            # per-chunk scores for a causal student
    given = model.sample(steps=2, n=2, seed=0, given_frames=1)   # I2V: the real first frame is kept
    assert torch.equal(given.x[:, :1], model.world.world.render(given.meta)[:, :1])
    with pytest.raises(UsageError, match="fused guidance"):
        model.sample(steps=2, n=2, guidance=3.0)


def test_bad_sampling_requests_are_refused(runs):
    model = anystep.load(runs["gmm"])
    with pytest.raises(UsageError, match="steps must be >= 1"):
        model.sample(steps=0)
    with pytest.raises(UsageError, match="noise must be"):
        model.sample(noise=torch.randn(2, 3))
    with pytest.raises(UsageError, match="agree on the number of samples"):
        model.sample(n=3, noise=torch.randn(2, *model.world.shape))
    with pytest.raises(UsageError, match="prompts are for the shapes world"):
        model.sample(prompts=["a red disk moving left"])


def test_sample_save_round_trips_bit_identically(runs, tmp_path, capsys):
    path = tmp_path / "out" / "s.safetensors"
    assert main(["sample", runs["shapes"], "--steps", "2", "--num", "3", "--seed", "5", "--prompt",
                 "a red disk moving left", "--out", str(tmp_path / "pic"), "--save", str(path)]) == 0
    assert (tmp_path / "pic.mp4").stat().st_size > 0 and f"wrote {path}" in capsys.readouterr().out
    back = anystep.load_samples(path)
    fresh = anystep.load(runs["shapes"]).sample(steps=2, n=3, seed=5, prompts=["a red disk moving left"])
    for name in ("x", "noise", "cond"):
        assert torch.equal(getattr(back, name), getattr(fresh, name)), name
    assert back.content == "videos" and back.labels == back.meta == ["a red disk moving left"] * 3
    assert {k: back.settings[k] for k in ("steps", "seed", "guidance", "spec", "role")} == {
        "steps": "2", "seed": "5", "guidance": "1.0", "spec": runs["shapes"], "role": "student"}
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["range"] == "[-1, 1]" and f.metadata()["content"] == "videos"
    assert anystep.load(runs["shapes"]).score(back) == anystep.load(runs["shapes"]).score(fresh)
    # gmm: latents and labels, the file only
    latents = tmp_path / "g.safetensors"
    assert main(["sample", runs["gmm"], "--num", "4", "--save", str(latents), "--no-picture",
                 "--out", str(tmp_path / "none")]) == 0
    g = anystep.load_samples(latents)
    assert g.content == "latents" and torch.equal(g.meta, torch.tensor([0, 1, 2, 3])) and g.labels[1] == "class 1"
    assert torch.equal(g.x, anystep.load(runs["gmm"]).sample(steps=4, n=4).x) and not list(tmp_path.glob("none*"))


@pytest.mark.parametrize("save, message", [
    ("s.pt", "must end in .safetensors"),
    ("afile/s.safetensors", "cannot make the folder"),
    ("adir.safetensors", "is a folder"),
])
def test_sample_save_refuses_a_bad_path_before_sampling(runs, tmp_path, monkeypatch, save, message, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.safetensors").mkdir()
    monkeypatch.setattr("anystep.recipes.sample.load", lambda spec: pytest.fail("sampled before the check"))
    assert main(["sample", runs["gmm"], "--save", save]) == 2
    assert message in capsys.readouterr().err


def test_no_picture_needs_a_file(runs, capsys):
    assert main(["sample", runs["gmm"], "--no-picture"]) == 2
    assert "nothing to write" in capsys.readouterr().err


def test_load_samples_names_what_is_wrong(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UsageError, match="samples file not found"):
        anystep.load_samples(tmp_path / "none.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UsageError, match="not an anystep samples file"):
        anystep.load_samples(tmp_path / "w.safetensors")


# ------------------------------------------------------------------------------------------------ grid labels
def _ink(img: np.ndarray) -> np.ndarray:
    """Text pixels: grey (r = g = b) and darker than the white background."""
    return (img.min(-1) < 200) & (img.max(-1) - img.min(-1) < 10)


def _ink_columns(draw_text) -> tuple[int, int]:
    """The first and last ink column of text drawn alone on a wide white canvas."""
    canvas = Image.new("RGB", (600, 40), "white")
    draw_text(ImageDraw.Draw(canvas))
    cols = np.argwhere(_ink(np.asarray(canvas)))[:, 1]
    return cols.min(), cols.max()


def test_grid_labels_are_never_cut(tmp_path):
    long_row, title = "AnyFlow Stage 2 N=16 (a long run name)", "a yellow triangle moving right supercalifragilistic"
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 1, 3, 1, 1).expand(2, 3, 3, 8, 8)
    frames = grid_frames({long_row: red, "N=1": red}, scale=4, columns=[title, "b"])
    img, w, pad = frames[0], 32, 2
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), label_font()
    cells = np.argwhere((img == [255, 0, 0]).all(-1))            # the red clips
    top, left = cells.min(0)
    assert left >= text_width(draw, long_row, font)               # the label column holds the measured label
    ink = _ink(img)
    # the row label: all of it (the same ink extent as drawn alone), left of the clips
    first, last = _ink_columns(lambda d: d.text((3, 5), long_row, fill=(0, 0, 0), font=font))
    label = np.argwhere(ink[top:top + w])[:, 1]
    assert (label.min(), label.max()) == (first, last) and last < left
    # the title wraps within its column: ink only inside the column, every line drawn
    lines = wrap_text(draw, title, font, w - TITLE_GAP)
    assert len(lines) > 2 and "".join(lines).replace(" ", "") == title.replace(" ", "")
    head = np.argwhere(ink[:top])
    assert head[:, 1].min() >= left and ((head[:, 1] - left) % (w + pad) < w).all()
    column0 = head[head[:, 1] < left + w]
    assert column0[:, 0].max() - column0[:, 0].min() >= (len(lines) - 1) * 10   # lines of a 10-px font
    # mp4s want sizes divisible by 16: the written frames are padded, never cropped
    mp4 = write_video(frames, tmp_path / "grid")[0]
    import imageio.v2 as imageio
    shape = imageio.mimread(mp4)[0].shape
    assert shape[0] % 16 == shape[1] % 16 == 0 and shape[0] >= img.shape[0] and shape[1] >= img.shape[1]


def test_wrap_keeps_every_character_and_fits_the_width():
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), label_font()
    text = "a red disk moving left extraordinarilylongwordthatcannotfit"
    for width in (20, 48, 400):
        lines = wrap_text(draw, text, font, width)
        assert " ".join(lines).replace(" ", "") == text.replace(" ", "")
        assert all(text_width(draw, line, font) <= width or len(line) == 1 for line in lines)
    assert wrap_text(draw, text, font, 1000) == [text]
