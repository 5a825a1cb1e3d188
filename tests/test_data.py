"""The data layer of the real Wan2.1 path, on the tiny offline Wan folder and a few tiny mp4 clips.

References are independent of the code under test: diffusers' ``WanPipeline`` (prompt encoding, sampling,
de-normalisation before decoding), the tiny VAE called directly with the normalisation written out from its
config, and clips whose pixels are known.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch

from anystep.data.encode import cache_videos
from anystep.data.latent_cache import CacheError, LatentCache, ShardWriter
from anystep.data.synthesize import read_prompts, synthesize
from anystep.data.text import WAN_NEGATIVE_PROMPT, encode_prompts, pad_embeddings
from anystep.data.video_io import VideoDecodeError, VideoPrep, VideoSourceError, list_items, read_video
from anystep.models.tiny_folder import build_tiny_wan_folder

FRAMES, SIZE = 9, 32  # latents (16, 3, 4, 4)
CAPTIONS = {"a.mp4": "a red block moving right", "b.mp4": "a green block moving down, slowly",
            "c.mp4": "blue"}
SETTINGS = {"frames": FRAMES, "height": SIZE, "width": SIZE, "dtype": "float32", "progress": False}


def write_clip(path: Path, seed: int, frames: int = FRAMES, size: tuple[int, int] = (48, 64)) -> Path:
    """A clip of a coloured block moving over a coloured background (h x w divisible by 16 for the codec)."""
    rng = np.random.default_rng(seed)
    background, block = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    video = np.empty((frames, *size, 3), np.uint8)
    for t in range(frames):
        video[t] = background
        video[t, 8 + t:24 + t, 4 + 3 * t:20 + 3 * t] = block
    imageio.mimwrite(path, list(video), fps=8)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_wan_folder(tmp_path_factory.mktemp("tiny") / "wan")


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import WanPipeline

    p = WanPipeline.from_pretrained(tiny)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three clips: a and b captioned by captions.json, c by a sidecar c.txt."""
    folder = tmp_path_factory.mktemp("clips")
    for seed, name in enumerate(CAPTIONS):
        write_clip(folder / name, seed)
    (folder / "captions.json").write_text(json.dumps({k: CAPTIONS[k] for k in ("a.mp4", "b.mp4")}))
    (folder / "c.txt").write_text(CAPTIONS["c.mp4"] + "\n")
    return folder


@pytest.fixture(scope="module")
def video_cache(tiny, clips, tmp_path_factory) -> Path:
    return cache_videos(tiny, clips, tmp_path_factory.mktemp("cache") / "c", shard_size=2, **SETTINGS)


def wan_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    """The reference: WanPipeline's own prompt encoding (padded to 512), under no_grad as in its __call__
    (with gradients on, CPU attention takes another kernel: differences of 1e-5)."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)[0]


def assert_same_cache(a: Path, b: Path) -> None:
    """Two caches hold bit-identical items in the same order."""
    ca, cb = LatentCache(a), LatentCache(b)
    assert ca.ids == cb.ids and ca.captions == cb.captions
    for x, y in zip(ca.batch(range(len(ca))), cb.batch(range(len(cb)))):
        assert torch.equal(x, y)
    assert torch.equal(ca.null_embedding(), cb.null_embedding())


# ----------------------------------------------------------------------------------------- text
def test_encode_prompts_match_wan_pipeline(pipe):
    prompts = ["a cat", "  a dog &amp; a\n   ball  ", WAN_NEGATIVE_PROMPT, "long " * 200]
    trimmed = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, max_len=512)
    lengths = [e.shape[0] for e in trimmed]
    assert lengths[0] == len("a cat") + 1 and lengths[3] == 512 and len(set(lengths)) == 4
    assert all(e.dtype == torch.float32 and e.device.type == "cpu" for e in trimmed)
    torch.testing.assert_close(pad_embeddings(trimmed, 512), wan_embeddings(pipe, prompts), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- video io
def test_read_video_crops_the_centre_and_scales_to_unit_range(tmp_path):
    """48 x 96 frames, red | blue | red in quarters: the centre crop after a cover-resize is all blue."""
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[:, :24] = frame[:, 72:] = (255, 0, 0)
    frame[:, 24:72] = (0, 0, 255)
    imageio.mimwrite(tmp_path / "v.mp4", [frame] * 5, fps=8)
    video = read_video(tmp_path / "v.mp4", 5, 32, 32, VideoPrep(resize="crop"))
    assert video.shape == (3, 5, 32, 32) and video.dtype == torch.float32
    inner = video[:, :, :, 3:-3]
    torch.testing.assert_close(inner, torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1, 1).expand_as(inner),
                               atol=0.08, rtol=0)
    assert video.min() >= -1 and video.max() <= 1


def test_read_video_stride_and_frame_count(tmp_path):
    frames = [np.full((32, 32, 3), 20 * t, np.uint8) for t in range(9)]
    imageio.mimwrite(tmp_path / "v.mp4", frames, fps=8)
    every = read_video(tmp_path / "v.mp4", 9, 32, 32, VideoPrep(fps=None))
    second = read_video(tmp_path / "v.mp4", 5, 32, 32, VideoPrep(fps=None, stride=2))
    torch.testing.assert_close(second, every[:, ::2])
    torch.testing.assert_close(every.mean(dim=(0, 2, 3)), torch.arange(9) * 20 / 127.5 - 1, atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        read_video(tmp_path / "v.mp4", 8, 32, 32)


def official_select_frame_indices(total_frames: int, original_fps: float, target_fps: float) -> list[int]:
    """The reference: the official picker (``select_frame_indices``, NVlabs/AnyFlow far/utils/video_util.py)
    restated: scan all ``total_frames`` source frames with a float accumulator that grows by
    target/original per frame and keeps frame i (losing 1) whenever it reaches 1; frame 0 is always kept."""
    kept, acc = [0], 0.0
    for i in range(1, total_frames):
        acc += target_fps / original_fps
        if acc >= 1.0:
            kept.append(i)
            acc -= 1.0
    return kept


def write_index_clip(path: Path, frames: int, fps: float) -> Path:
    """A clip whose frame i shows i in its brightness: left half (i % 16), right half (i // 16), in steps of
    16 grey levels (the codec's error is ~1 level)."""
    video = np.zeros((frames, 32, 48, 3), np.uint8)
    for i in range(frames):
        video[i, :, :24] = (i % 16) * 16 + 8
        video[i, :, 24:] = (i // 16) * 16 + 8
    imageio.mimwrite(path, list(video), fps=fps)
    return path


def frame_numbers(video: torch.Tensor) -> list[int]:
    """The source frame index each frame of a ``read_video`` output (3, F, 32, 32) shows."""
    grey = (video.mean(0) + 1) * 127.5                      # (F, 32, 32), stretched 48 -> 32 wide
    low, high = grey[:, 8:24, 2:12].mean((1, 2)), grey[:, 8:24, 20:30].mean((1, 2))
    return [int(a) + 16 * int(b) for a, b in zip(((low - 8) / 16).round(), ((high - 8) / 16).round())]


@pytest.mark.parametrize("source_fps, frames, expected_span", [(30, 33, 60), (8, 9, 8), (24, 17, 24)])
def test_read_video_resamples_to_16_fps_with_the_official_picker(tmp_path, source_fps, frames, expected_span):
    """Default preparation = the official one: 16 fps by time from the container's frame rate. At 30 fps,
    33 frames span 2 s of the source (frames 0..60), not 33 consecutive frames; at 8 fps (below 16) every
    frame is kept, as the official picker does."""
    clip = write_index_clip(tmp_path / "v.mp4", expected_span + 10, source_fps)
    picked = frame_numbers(read_video(clip, frames, 32, 32))
    assert picked == official_select_frame_indices(expected_span + 10, source_fps, 16)[:frames]
    assert picked[-1] in (expected_span, expected_span + 1)   # the last frame is ~2 s (30, 24) / 1 s (8) in
    if source_fps > 16:   # the k-th frame is the first source frame at time k/16 s (float rounding: +1 frame)
        exact = [math.ceil(k * source_fps / 16) for k in range(frames)]
        assert all(0 <= p - e <= 1 for p, e in zip(picked, exact))
    assert frame_numbers(read_video(clip, frames, 32, 32, VideoPrep(fps=None, stride=2))) == list(
        range(0, 2 * frames, 2))


def test_official_picker_keeps_its_float_rounding():
    """At 30 fps the official float accumulator reaches 0.99999... where exact arithmetic reaches 1, and takes
    frame 16 for output frame 8 (exactly 0.5 s would be frame 15): anystep takes the same frames."""
    from anystep.data.video_io import resample_indices

    for source_fps in (23.976, 24, 25, 29.97, 30, 50, 59.94, 60, 120, 8, 16):
        assert resample_indices(81, source_fps, 16) == official_select_frame_indices(2000, source_fps, 16)[:81]
    assert resample_indices(9, 30, 16)[8] == 16


def test_too_short_or_unknown_fps_videos_raise_clear_errors(tmp_path):
    clip = write_index_clip(tmp_path / "v.mp4", 40, 30)       # 33 frames at 16 fps need source frames 0..61
    with pytest.raises(VideoDecodeError, match="40 frames; 33 frames at 16 fps \\(source 30 fps\\) need 62"):
        read_video(clip, 33, 32, 32)
    with pytest.raises(VideoDecodeError, match="no frame rate.*--stride"):
        VideoPrep().indices(5, 0.0, "x.mp4")                   # imageio reports fps 0 when it finds none
    with pytest.raises(ValueError, match="not both"):
        VideoPrep(fps=16, stride=2)
    assert VideoPrep(fps=0).settings() == {"fps": None, "stride": 1, "resize": "stretch"}
    with pytest.raises(ValueError, match="resize"):
        VideoPrep(resize="pad")


def test_stretch_resize_keeps_the_whole_frame(tmp_path):
    """A 48 x 96 frame with a 6-pixel red border round a blue inside: stretched to 32 x 32 the border is on
    all four sides (the official resize); the centre-crop of the same frame has lost the left and right."""
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[:] = (255, 0, 0)
    frame[6:-6, 6:-6] = (0, 0, 255)
    imageio.mimwrite(tmp_path / "v.mp4", [frame] * 5, fps=16)
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
    video = read_video(tmp_path / "v.mp4", 5, 32, 32)[:, 0]           # (3, 32, 32) of the first frame
    for edge in (video[:, 0, 4:-4], video[:, -1, 4:-4], video[:, 4:-4, 0], video[:, 4:-4, -1]):
        torch.testing.assert_close(edge, red[:, None].expand_as(edge), atol=0.15, rtol=0)
    torch.testing.assert_close(video[:, 12:20, 12:20], blue[:, None, None].expand(3, 8, 8), atol=0.1, rtol=0)
    cropped = read_video(tmp_path / "v.mp4", 5, 32, 32, VideoPrep(resize="crop"))[:, 0]
    assert (cropped[:, 8:24, 0] - blue[:, None]).abs().max() < 0.15    # the left border is gone


def test_caption_sources(tmp_path):
    for name in ("x.mp4", "y.mp4"):
        (tmp_path / name).write_bytes(b"")  # listing does not decode
    (tmp_path / "captions.tsv").write_text("x.mp4\tfirst caption\ny.mp4\tsecond\n")
    assert [(i.id, i.caption) for i in list_items(tmp_path)] == [("x.mp4", "first caption"), ("y.mp4", "second")]
    (tmp_path / "captions.tsv").unlink()
    (tmp_path / "captions.json").write_text(json.dumps([{"video": "x.mp4", "caption": "cx"},
                                                        {"video": "y.mp4", "caption": "cy"}]))
    assert [i.caption for i in list_items(tmp_path)] == ["cx", "cy"]
    (tmp_path / "captions.json").write_text(json.dumps({"x.mp4": "cx"}))
    with pytest.raises(VideoSourceError, match="y.mp4"):
        list_items(tmp_path)
    (tmp_path / "y.txt").write_text("from the sidecar")
    assert list_items(tmp_path)[1].caption == "from the sidecar"
    (tmp_path / "captions.json").unlink()
    (tmp_path / "captions.txt").write_text("x.mp4 no tab here\n")
    with pytest.raises(VideoSourceError, match="line 1"):
        list_items(tmp_path)


def test_source_errors(tiny, tmp_path):
    with pytest.raises(VideoSourceError, match="no videos"):
        cache_videos(tiny, tmp_path, tmp_path / "out", **SETTINGS)
    write_clip(tmp_path / "lonely.mp4", 0)
    with pytest.raises(VideoSourceError, match="lonely.mp4"):
        cache_videos(tiny, tmp_path, tmp_path / "out", **SETTINGS)
    (tmp_path / "lonely.txt").write_text("now captioned")
    with pytest.raises(ValueError, match="4k \\+ 1"):
        cache_videos(tiny, tmp_path, tmp_path / "out", **{**SETTINGS, "frames": 8})


# ----------------------------------------------------------------------------------------- cache
def test_cached_latents_are_normalised_posterior_means(tiny, clips, video_cache, pipe):
    from diffusers import AutoencoderKLWan

    cache = LatentCache(video_cache)
    assert len(cache) == 3 and cache.latent_shape == (16, 3, 4, 4) and cache.text_dim == 32
    assert cache.ids == list(CAPTIONS) and cache.captions == list(CAPTIONS.values())
    config = json.loads((tiny / "vae" / "config.json").read_text())
    mean = torch.tensor(config["latents_mean"]).view(1, 16, 1, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, 16, 1, 1, 1)
    vae = AutoencoderKLWan.from_pretrained(tiny, subfolder="vae")
    latents, embeds = cache.batch([0, 1, 2])
    for i, name in enumerate(CAPTIONS):
        with torch.no_grad():
            raw = vae.encode(read_video(clips / name, FRAMES, SIZE, SIZE)[None]).latent_dist.mean
        torch.testing.assert_close(latents[i:i + 1], (raw - mean) / std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(embeds, wan_embeddings(pipe, list(CAPTIONS.values())), rtol=0, atol=0)


def test_cached_latent_decodes_like_the_raw_mean_through_the_pipeline(tiny, clips, video_cache, pipe):
    """WanPipeline de-normalises its final latents before decoding: feed it a cached latent as the last
    denoising state and it must decode the VAE's raw posterior mean."""
    cached, _ = LatentCache(video_cache).batch([1])
    null = LatentCache(video_cache).null_embedding()
    video = pipe(prompt_embeds=null, guidance_scale=1.0, num_inference_steps=1, num_frames=FRAMES, height=SIZE,
                 width=SIZE, output_type="pt", callback_on_step_end=lambda *_: {"latents": cached}).frames
    with torch.no_grad():
        raw = pipe.vae.encode(read_video(clips / "b.mp4", FRAMES, SIZE, SIZE)[None]).latent_dist.mean
        reference = (pipe.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(video, reference, rtol=0, atol=1e-5)


def test_resumed_cache_equals_one_shot(tiny, clips, video_cache, tmp_path):
    out = tmp_path / "resumed"
    cache_videos(tiny, clips, out, shard_size=2, limit=1, **SETTINGS)
    assert LatentCache(out).ids == ["a.mp4"]
    cache_videos(tiny, clips, out, shard_size=2, **SETTINGS)
    assert [s["count"] for s in json.loads((out / "index.json").read_text())["shards"]] == [1, 2]
    assert_same_cache(out, video_cache)
    cache_videos(tiny, clips, out, shard_size=2, **SETTINGS)  # nothing left to do
    assert len(LatentCache(out)) == 3


def test_header_mismatch_names_the_field(tiny, clips, video_cache):
    with pytest.raises(CacheError, match="height"):
        cache_videos(tiny, clips, video_cache, shard_size=2, **{**SETTINGS, "height": 48})
    header = json.loads((video_cache / "index.json").read_text())
    header = {k: v for k, v in header.items() if k not in ("shards", "skipped")}
    with pytest.raises(CacheError, match="settings.stride"):
        ShardWriter(video_cache, 2, {**header, "settings": {**header["settings"], "stride": 2}})


def test_header_records_the_frame_preparation(tiny, clips, video_cache, tmp_path):
    settings = json.loads((video_cache / "index.json").read_text())["settings"]
    assert {k: settings[k] for k in ("fps", "stride", "resize")} == {"fps": 16.0, "stride": None,
                                                                    "resize": "stretch"}
    out = cache_videos(tiny, clips, tmp_path / "old", fps=None, stride=2, resize="crop",
                       **{**SETTINGS, "frames": 5})
    settings = json.loads((out / "index.json").read_text())["settings"]
    assert {k: settings[k] for k in ("fps", "stride", "resize")} == {"fps": None, "stride": 2, "resize": "crop"}
    with pytest.raises(CacheError, match="settings.fps is None in the cache but 16.0 now"):
        cache_videos(tiny, clips, out, **{**SETTINGS, "frames": 5})


def test_cache_cli_frame_options(tiny, clips, tmp_path, capsys):
    from anystep.cli import main

    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    text = capsys.readouterr().out
    for phrase in ("16 fps", "--stride", "--resize", "stretch", "crop", "without crop"):
        assert phrase in " ".join(text.split()), phrase
    common = ["cache", "--model", str(tiny), "--videos", str(clips), "--frames", "5", "--height", "32",
              "--width", "32", "--dtype", "float32", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "both"), "--fps", "16", "--stride", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "stride"), "--stride", "2", "--resize", "crop"]) == 0
    settings = json.loads((tmp_path / "stride" / "index.json").read_text())["settings"]
    assert {k: settings[k] for k in ("fps", "stride", "resize")} == {"fps": None, "stride": 2, "resize": "crop"}
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert json.loads((tmp_path / "default" / "index.json").read_text())["settings"]["fps"] == 16.0


def test_tar_shards_equal_the_folder_source(tiny, clips, video_cache, tmp_path):
    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "part-0.tar", "w") as tar:
        for key in ("a", "b"):
            add(tar, f"{key}.mp4", (clips / f"{key}.mp4").read_bytes())
        add(tar, "a.txt", CAPTIONS["a.mp4"].encode())
        add(tar, "b.json", json.dumps({"caption": CAPTIONS["b.mp4"], "fps": 8}).encode())
    with tarfile.open(shards / "part-1.tar", "w") as tar:
        add(tar, "c.mp4", (clips / "c.mp4").read_bytes())
        add(tar, "c.txt", CAPTIONS["c.mp4"].encode())
    out = cache_videos(tiny, shards, tmp_path / "from_tar", shard_size=2, **SETTINGS)
    from_tar, from_folder = LatentCache(out), LatentCache(video_cache)
    assert from_tar.ids == ["part-0.tar/a", "part-0.tar/b", "part-1.tar/c"]
    assert from_tar.captions == from_folder.captions
    for x, y in zip(from_tar.batch([0, 1, 2]), from_folder.batch([0, 1, 2])):
        assert torch.equal(x, y)
    assert [i.id for i in list_items(shards / "part-1.tar")] == ["part-1.tar/c"]


def test_unreadable_and_short_videos_are_skipped_and_counted(tiny, clips, tmp_path):
    shutil.copy(clips / "a.mp4", tmp_path / "good.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not an mp4" * 50)
    write_clip(tmp_path / "short.mp4", 1, frames=5)
    for name in ("good", "broken", "short"):
        (tmp_path / f"{name}.txt").write_text(f"caption of {name}")
    with pytest.warns(UserWarning, match="skipping broken.mp4") as record:
        out = cache_videos(tiny, tmp_path, tmp_path / "out", **SETTINGS)
    assert any("short.mp4" in str(w.message) for w in record)
    assert LatentCache(out).ids == ["good.mp4"]
    assert sorted(json.loads((out / "index.json").read_text())["skipped"]) == ["broken.mp4", "short.mp4"]


def test_bfloat16_cache_rounds_the_float32_latents(tiny, clips, video_cache, tmp_path):
    out = cache_videos(tiny, clips, tmp_path / "bf16", **{**SETTINGS, "dtype": "bfloat16"})
    from safetensors.torch import load_file

    assert load_file(out / "shard-00000.safetensors")["latents"].dtype == torch.bfloat16
    latents, embeds = LatentCache(out).batch([0, 1, 2])
    reference, reference_embeds = LatentCache(video_cache).batch([0, 1, 2])
    assert torch.equal(latents, reference.bfloat16().float())  # the VAE runs in float32 either way
    torch.testing.assert_close(embeds, reference_embeds, atol=0.05, rtol=0.05)  # UMT5 in bfloat16


# ----------------------------------------------------------------------------------------- reader
def test_cache_reader_errors(video_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(video_cache, copy)
    data = (copy / "shard-00000.safetensors").read_bytes()
    (copy / "shard-00000.safetensors").write_bytes(data[: len(data) // 2])
    cache = LatentCache(copy)
    assert cache.batch([2])[0].shape == (1, 16, 3, 4, 4)  # the other shard still reads
    with pytest.raises(CacheError, match="shard-00000.safetensors"):
        cache.batch([0])
    (copy / "index.json").write_text("{ not json")
    with pytest.raises(CacheError, match="index.json"):
        LatentCache(copy)
    with pytest.raises(CacheError, match="index.json"):
        LatentCache(tmp_path / "nowhere")


def test_sample_is_reproducible_and_null_embedding_is_zero_padded(video_cache, pipe):
    cache = LatentCache(video_cache)
    first = cache.sample(5, torch.Generator().manual_seed(7))
    again = cache.sample(5, torch.Generator().manual_seed(7))
    by_hand = cache.batch(torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(7)))
    for x, y, z in zip(first, again, by_hand):
        assert torch.equal(x, y) and torch.equal(x, z)
    assert first[0].shape == (5, 16, 3, 4, 4) and first[1].shape == (5, 512, 32)
    null = cache.null_embedding()
    reference = wan_embeddings(pipe, [WAN_NEGATIVE_PROMPT])
    length = int((reference[0].abs().sum(-1) > 0).sum())
    assert null.shape == (1, 512, 32) and 100 < length < 512
    assert torch.equal(null, reference) and null[0, length:].abs().sum() == 0 and null[0, :length].abs().min() > 0
    assert LatentCache(video_cache, max_text_len=600).null_embedding().shape == (1, 600, 32)


# ----------------------------------------------------------------------------------------- synthesize
SYNTH = {"steps": 2, "guidance": 5.0, "frames": 5, "height": SIZE, "width": SIZE, "seed": 3, "dtype": "float32",
         "shard_size": 2, "progress": False}
PROMPTS = ["a red square", "a blue circle drifting", "green"]


def test_synthesize_matches_wan_pipeline(tiny, pipe, tmp_path):
    cache = LatentCache(synthesize(tiny, PROMPTS, tmp_path / "teacher", **SYNTH))
    assert cache.ids == ["00000000", "00000001", "00000002"] and cache.captions == PROMPTS
    latents, embeds = cache.batch([0, 1, 2])
    for i, prompt in enumerate(PROMPTS):
        reference = pipe(prompt=prompt, negative_prompt=WAN_NEGATIVE_PROMPT, num_inference_steps=2,
                         guidance_scale=5.0, num_frames=5, height=SIZE, width=SIZE, output_type="latent",
                         generator=torch.Generator().manual_seed(3 + i), max_sequence_length=512).frames
        torch.testing.assert_close(latents[i:i + 1], reference, rtol=0, atol=0)
    torch.testing.assert_close(embeds, wan_embeddings(pipe, PROMPTS), rtol=0, atol=0)
    assert json.loads((tmp_path / "teacher" / "index.json").read_text())["source"] == "teacher"


def test_synthesize_resumes_and_checks_prompts(tiny, tmp_path):
    synthesize(tiny, PROMPTS, tmp_path / "once", **SYNTH)
    synthesize(tiny, PROMPTS[:1], tmp_path / "twice", **SYNTH)
    synthesize(tiny, PROMPTS, tmp_path / "twice", **SYNTH)
    assert_same_cache(tmp_path / "once", tmp_path / "twice")
    with pytest.raises(ValueError, match="00000001"):
        synthesize(tiny, [PROMPTS[0], "another prompt", PROMPTS[2]], tmp_path / "twice", **SYNTH)
    with pytest.raises(CacheError, match="settings.seed"):
        synthesize(tiny, PROMPTS, tmp_path / "twice", **{**SYNTH, "seed": 4})


def test_synthesize_with_a_given_transformer(tiny, tmp_path):
    from diffusers import WanPipeline

    from anystep.models.tiny_folder import tiny_wan_components

    other = tiny_wan_components(seed=1)["transformer"]
    cache = LatentCache(synthesize(tiny, PROMPTS[:1], tmp_path / "t", transformer=other, **SYNTH))
    reference_pipe = WanPipeline.from_pretrained(tiny, transformer=other)
    reference_pipe.set_progress_bar_config(disable=True)
    reference = reference_pipe(prompt=PROMPTS[0], negative_prompt=WAN_NEGATIVE_PROMPT, num_inference_steps=2,
                               guidance_scale=5.0, num_frames=5, height=SIZE, width=SIZE, output_type="latent",
                               generator=torch.Generator().manual_seed(3)).frames
    torch.testing.assert_close(cache.batch([0])[0], reference, rtol=0, atol=0)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n  two  \n")
    (tmp_path / "p.json").write_text(json.dumps(["one", "two"]))
    assert read_prompts(tmp_path / "p.txt") == read_prompts(tmp_path / "p.json") == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
