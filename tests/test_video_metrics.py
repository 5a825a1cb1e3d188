"""Video metrics without downloads (latent RMSE, PSNR, flicker, CLIP score) and the VBench hook's wiring.

References are hand computations, formulas, VBench's definition written out as a loop, and an independent CLIP
computation through ``CLIPModel.get_image_features / get_text_features``; VBench itself is a fake module that
records its calls.
"""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from anystep.errors import UsageError
from anystep.evaluate import vbench as vb
from anystep.evaluate import video_metrics as vm


# ---------------------------------------------------------------- agreement with the teacher
def test_latent_rmse_of_constant_offsets_and_of_one_changed_entry():
    a = torch.randn(3, 2, 4, 5, 6, dtype=torch.float64)
    offset = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64).view(3, 1, 1, 1, 1)
    assert torch.allclose(vm.latent_rmse(a + offset, a), torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64))
    b = a.clone()
    b[1, 1, 2, 3, 4] += 3.0                          # one entry of 2*4*5*6 = 240 changed by 3
    expected = torch.tensor([0.0, 3.0 / math.sqrt(240), 0.0], dtype=torch.float64)
    assert torch.allclose(vm.latent_rmse(a, b), expected)


def test_psnr_is_20_log10_of_range_over_rmse_and_inf_when_identical():
    a = torch.rand(2, 3, 3, 8, 8) * 1.6 - 0.8
    b = a + torch.tensor([0.1, -0.02]).view(2, 1, 1, 1, 1)
    expected = torch.tensor([20 * math.log10(2 / 0.1), 20 * math.log10(2 / 0.02)])   # 26.02 dB, 40 dB
    assert torch.allclose(vm.psnr(a, b), expected, atol=1e-3)
    assert torch.isinf(vm.psnr(a, a)).all()


def test_metrics_compute_in_float32_from_bf16_and_refuse_bad_shapes():
    a = torch.zeros(1, 2, 3, 4, 4, dtype=torch.bfloat16)
    out = vm.latent_rmse(a + 1, a)
    assert out.dtype == torch.float32 and out.item() == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        vm.latent_rmse(torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="RGB videos"):
        vm.psnr(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_metrics_stay_on_their_inputs_device():
    """Inputs on ``meta`` stand for a GPU here: a tensor the metrics made on the CPU would make them fail."""
    a, b = torch.empty(2, 3, 3, 4, 4, device="meta"), torch.empty(2, 3, 3, 4, 4, device="meta")
    for metric in (vm.latent_rmse(a, b), vm.psnr(a, b), vm.flicker(a), vm.flicker_score(a)):
        assert metric.device.type == "meta" and metric.shape == (2,)


# ---------------------------------------------------------------- temporal flicker
def vbench_flicker_reference(frames_uint8: np.ndarray) -> float:
    """VBench's temporal_flickering before its score, written out: per consecutive pair the mean absolute
    difference over pixels and channels, then the mean over pairs (frames (F, H, W, 3), 0..255)."""
    f = frames_uint8.astype(np.float64)
    return float(np.mean([np.mean(np.abs(f[i] - f[i + 1])) for i in range(len(f) - 1)]))


def test_flicker_of_alternating_frames_matches_the_hand_value_and_vbench_definition():
    gen = torch.Generator().manual_seed(0)
    img_a = torch.randint(0, 256, (8, 8, 3), generator=gen)
    img_b = torch.randint(0, 256, (8, 8, 3), generator=gen)
    frames = torch.stack([img_a, img_b, img_a, img_b, img_a])           # 5 frames, 4 pairs, all |a - b|
    video = (frames.permute(0, 3, 1, 2).double() / 127.5 - 1)[None]    # (1, F, 3, H, W) in [-1, 1]
    hand = (img_a - img_b).abs().double().mean().item()
    assert vm.flicker(video).item() == pytest.approx(hand, abs=1e-9)
    assert vm.flicker(video).item() == pytest.approx(vbench_flicker_reference(frames.numpy()), abs=1e-9)
    assert vm.flicker_score(video).item() == pytest.approx((255 - hand) / 255, abs=1e-12)


def test_flicker_of_a_static_video_is_zero_score_one_and_one_frame_is_refused():
    static = (torch.rand(2, 1, 3, 6, 6) * 2 - 1).expand(2, 4, 3, 6, 6)
    assert torch.equal(vm.flicker(static), torch.zeros(2))
    assert torch.equal(vm.flicker_score(static), torch.ones(2))
    with pytest.raises(ValueError, match="at least 2 frames"):
        vm.flicker(torch.zeros(1, 1, 3, 6, 6))


# ---------------------------------------------------------------- CLIP text-video score
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return vm.tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


def reference_clip_score(folder, videos, texts):
    """100 x frame-mean cosine through CLIPModel's own feature functions, frames already at the model's size,
    normalised with the mean/std read from the folder's preprocessor config."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    mean = torch.tensor(cfg["image_mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["image_std"]).view(3, 1, 1)

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    scores = []
    with torch.no_grad():
        for video, text in zip(videos, texts):
            ids = tok([text], return_tensors="pt")
            t = feats(model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask))[0]
            cos = []
            for frame in video:
                pix = (((frame + 1) / 2 - mean) / std)[None]
                i = feats(model.get_image_features(pixel_values=pix))[0]
                cos.append(torch.dot(i, t) / (i.norm() * t.norm()))
            scores.append(100 * torch.stack(cos).mean())
    return torch.stack(scores)


def test_clip_score_equals_an_independent_computation(clip_folder):
    cfg = json.loads((clip_folder / "preprocessor_config.json").read_text())
    assert cfg["image_mean"] != [0.48145466, 0.4578275, 0.40821073]     # so the test sees the folder's are read
    videos = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    texts = ["a red disk moving left", "a blue square moving up"]
    scorer = vm.ClipScorer(clip_folder)
    assert torch.allclose(scorer(videos, texts), reference_clip_score(clip_folder, videos, texts), atol=1e-4)


def test_clip_score_differs_between_texts_and_is_unchanged_by_resizing_a_flat_video(clip_folder):
    scorer = vm.ClipScorer(clip_folder)
    video = torch.rand(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    a, b = scorer(video, ["a red disk"]), scorer(video, ["a green triangle moving right"])
    assert (a - b).abs().item() > 1e-3
    colour = torch.tensor([0.6, -0.2, 0.1]).view(1, 1, 3, 1, 1)
    small, wide = colour.expand(1, 2, 3, 32, 32), colour.expand(1, 2, 3, 40, 72)   # resized and cropped
    assert torch.allclose(scorer(wide, ["x"]), scorer(small, ["x"]), atol=1e-3)


def test_clip_score_of_a_wide_video_is_that_of_its_centre_square(clip_folder):
    """CLIP's processor resizes the shorter side and crops the centre: a 32 x 64 video (shorter side already
    32) scores as its central 32 x 32 columns, whatever lies outside them."""
    scorer = vm.ClipScorer(clip_folder)
    gen = torch.Generator().manual_seed(3)
    wide = torch.rand(1, 2, 3, 32, 64, generator=gen) * 2 - 1
    centre = wide[..., 16:48].clone()
    wide[..., :16], wide[..., 48:] = 1.0, -1.0
    assert torch.allclose(scorer(wide, ["a cat"]), scorer(centre, ["a cat"]), atol=1e-5)


def test_clip_scorer_refuses_a_missing_or_wrong_folder_and_miscounted_prompts(clip_folder, tmp_path):
    with pytest.raises(UsageError, match="no-such-clip"):
        vm.ClipScorer(tmp_path / "no-such-clip")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UsageError, match="not a CLIP model"):
        vm.ClipScorer(tmp_path / "t5")
    with pytest.raises(ValueError, match="one prompt per video"):
        vm.ClipScorer(clip_folder)(torch.zeros(2, 2, 3, 32, 32), ["only one"])


# ---------------------------------------------------------------- the VBench hook (wiring only)
PROMPTS = [{"prompt_en": "a cat", "dimension": ["subject_consistency", "temporal_flickering"],
            "aug_prompt_en": "a fluffy cat sitting still on a sofa"},
           {"prompt_en": "a red car", "dimension": ["color"], "aug_prompt_en": "a shiny red car parked"}]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "VBench_aug_full_info.json"
    path.write_text(json.dumps(PROMPTS))
    return path


@pytest.fixture
def fake_vbench(tmp_path, monkeypatch):
    """A ``vbench`` module whose VBench records its calls and writes results as VBench does."""
    calls = []
    pkg = tmp_path / "site" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "VBench_full_info.json").write_text(json.dumps(PROMPTS))

    class VBench:
        def __init__(self, device, full_info_dir, output_path):
            calls.append(("init", device, full_info_dir, output_path))
            self.output_path = output_path

        def evaluate(self, videos_path, name, prompt_list=(), dimension_list=None, local=False, **kwargs):
            calls.append(("evaluate", videos_path, name, list(dimension_list), local, kwargs))
            results = {d: [0.5 + 0.01 * len(calls), [{"video_path": "x"}]] for d in dimension_list}
            with open(f"{self.output_path}/{name}_eval_results.json", "w") as f:
                json.dump(results, f)

    module = types.ModuleType("vbench")
    module.__file__ = str(pkg / "__init__.py")
    module.VBench = VBench
    monkeypatch.setitem(sys.modules, "vbench", module)
    return calls


def test_vbench_samples_follow_the_protocol(prompts_file):
    samples = vb.vbench_samples(prompts_file)
    assert len(samples) == 2 * 5
    assert [s.seed for s in samples] == list(range(10))
    assert samples[7].prompt == "a red car" and samples[7].index == 2
    assert samples[7].text == "a shiny red car parked" and samples[7].filename == "a red car-2.mp4"
    only = vb.vbench_samples(prompts_file, samples_per_prompt=2, extended=False, dimensions=["color"])
    assert [(s.text, s.index, s.seed) for s in only] == [("a red car", 0, 0), ("a red car", 1, 1)]
    plain = prompts_file.with_name("plain.json")
    plain.write_text(json.dumps([{"prompt_en": "a cat", "dimension": ["color"]}]))
    with pytest.raises(UsageError, match="aug_prompt_en"):
        vb.vbench_samples(plain)
    with pytest.raises(UsageError, match="'/'"):
        vb.video_name("a/b", 0)


def test_write_vbench_videos_names_and_writes_mp4s(prompts_file, tmp_path):
    import imageio.v2 as imageio

    samples = vb.vbench_samples(prompts_file, samples_per_prompt=1)
    videos = torch.rand(2, 4, 3, 16, 16) * 2 - 1
    paths = vb.write_vbench_videos(videos, samples, tmp_path / "videos")
    assert sorted(p.name for p in paths) == ["a cat-0.mp4", "a red car-0.mp4"]
    assert len(imageio.mimread(paths[0])) == 4
    with pytest.raises(ValueError, match="2 videos for 1 samples"):
        vb.write_vbench_videos(videos, samples[:1], tmp_path / "videos")
    with pytest.raises(ValueError, match="even height and width"):
        vb.write_vbench_videos(videos[..., :15], samples, tmp_path / "videos")


def test_run_vbench_calls_vbench_per_dimension_and_resumes(fake_vbench, prompts_file, tmp_path):
    videos = tmp_path / "videos"
    vb.write_vbench_videos(torch.zeros(1, 2, 3, 16, 16), vb.vbench_samples(prompts_file)[:1], videos)
    out = tmp_path / "out"
    scores = vb.run_vbench(videos, out, ["temporal_flickering", "subject_consistency"], local=True)
    default_info = str(tmp_path / "site" / "vbench" / "VBench_full_info.json")
    assert fake_vbench[0] == ("init", "cuda", default_info, str(out))
    assert fake_vbench[1:] == [
        ("evaluate", str(videos), "temporal_flickering", ["temporal_flickering"], True, {"mode": "vbench_standard"}),
        ("evaluate", str(videos), "subject_consistency", ["subject_consistency"], True, {"mode": "vbench_standard"})]
    assert scores == {"temporal_flickering": 0.52, "subject_consistency": 0.53}
    assert json.loads((out / "scores.json").read_text()) == scores
    fake_vbench.clear()
    assert vb.run_vbench(videos, out, ["subject_consistency"]) == {"subject_consistency": 0.53}
    assert fake_vbench == []                                      # read back, not run again


def test_run_vbench_refuses_bad_input_with_clear_errors(fake_vbench, prompts_file, tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    with pytest.raises(UsageError, match="does not exist"):
        vb.run_vbench(videos, tmp_path / "out", ["temporal_flickering"])
    videos.mkdir()
    with pytest.raises(UsageError, match="no .mp4"):
        vb.run_vbench(videos, tmp_path / "out", ["temporal_flickering"])
    vb.write_vbench_videos(torch.zeros(1, 2, 3, 16, 16), [vb.VBenchSample("a dog", "a dog", 0, 0)], videos)
    with pytest.raises(UsageError, match="named"):                # not a prompt of the prompt file
        vb.run_vbench(videos, tmp_path / "out", ["temporal_flickering"], prompts_file=prompts_file)
    (videos / "a cat-0.gif").write_bytes(b"")
    with pytest.raises(UsageError, match="other files than mp4s"):
        vb.run_vbench(videos, tmp_path / "out", ["temporal_flickering"], prompts_file=prompts_file)
    with pytest.raises(UsageError, match="unknown VBench dimension"):
        vb.run_vbench(videos, tmp_path / "out", ["flicker"])
    with pytest.raises(UsageError, match="vbench_standard"):
        vb.run_vbench(videos, tmp_path / "out", ["color"], mode="custom_input")
    assert fake_vbench == []
    monkeypatch.setitem(sys.modules, "vbench", None)              # not installed: import fails
    with pytest.raises(UsageError, match="pip install vbench"):
        vb.run_vbench(videos, tmp_path / "out", ["temporal_flickering"], mode="custom_input")


def test_vbench_total_follows_the_leaderboard_formula():
    best = {d: vb.NORMALIZATION.get(d, (0.0, 1.0))[1] for d in vb.DIMENSIONS}
    assert vb.vbench_total(best) == pytest.approx({"quality": 1.0, "semantic": 1.0, "total": 1.0})
    worst = {d: vb.NORMALIZATION.get(d, (0.0, 1.0))[0] for d in vb.DIMENSIONS}
    assert vb.vbench_total(worst) == pytest.approx({"quality": 0.0, "semantic": 0.0, "total": 0.0})
    # dynamic degree at 0 (weight 0.5 of 6.5), temporal flickering halfway: quality = (5 + 0.5) / 6.5
    mixed = dict(best, dynamic_degree=0.0, temporal_flickering=(0.6293 + 1.0) / 2, scene=0.8222 / 4)
    total = vb.vbench_total(mixed)
    assert total["quality"] == pytest.approx(5.5 / 6.5)
    assert total["semantic"] == pytest.approx(8.25 / 9)
    assert total["total"] == pytest.approx(0.8 * 5.5 / 6.5 + 0.2 * 8.25 / 9)
    with pytest.raises(UsageError, match="missing"):
        vb.vbench_total({"scene": 0.5})


def test_vbench_command_line(fake_vbench, prompts_file, tmp_path, capsys):
    videos = tmp_path / "videos"
    vb.write_vbench_videos(torch.zeros(1, 2, 3, 16, 16), vb.vbench_samples(prompts_file)[:1], videos)
    rc = vb.main([str(videos), "--out", str(tmp_path / "out"), "--dimensions", "temporal_flickering",
                  "--prompts-file", str(prompts_file), "--device", "cuda:1"])
    assert rc == 0 and "temporal_flickering" in capsys.readouterr().out
    assert fake_vbench[0][1:3] == ("cuda:1", str(prompts_file))
    assert vb.main([str(videos), "--out", str(tmp_path / "out"), "--dimensions", "flicker"]) == 2
    assert "unknown VBench dimension" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        vb.main(["--help"])
    assert exit_.value.code == 0 and "--dimensions" in capsys.readouterr().out


def test_the_hook_module_imports_nothing_heavy():
    """In a VBench environment (transformers 4.33, no diffusers) the hook must import: stdlib only."""
    import subprocess

    code = ("import sys; import anystep.evaluate.vbench; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
