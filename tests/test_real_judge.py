"""Judging a real-path (wan world) student against its teacher's samples, on a tiny random Wan2.1 folder:
the evaluation set, the decoder, the teacher's reference (made once, cached, refused for another set), and
``anystep sweep`` on a tiny-Wan Stage-2 run (table, csv, plot and grid, with a tiny random CLIP folder)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from anystep.cli import main
from anystep.errors import UsageError
from anystep.evaluate.real_judge import decode_latents, load_vae, reference_judge, sample_reference
from anystep.evaluate.sweep import Sampler, SweepConfig, sample_batched
from anystep.evaluate.video_metrics import tiny_clip_folder
from anystep.models import zoo
from anystep.models.tiny_folder import build_tiny_wan_folder, write_tiny_clips
from anystep.recipes.sweep import sweep_settings
from anystep.worlds.wan import WanData, WanWorldConfig

LORA = ["model.lora_rank=4", "model.lora_alpha=8", "train.batch_size=2", "train.log_every=1"]


def _run(*argv, progress=False):
    assert main([*map(str, argv), *([] if progress else ["--no-progress"])]) == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Wan folder and a latent cache of 3 clips (9 frames, 32 x 32: latents (3, 16, 4, 4))."""
    root = tmp_path_factory.mktemp("real_judge")
    wan = build_tiny_wan_folder(root / "wan")
    clips = write_tiny_clips(root / "clips", n=3, frames=9, height=48, width=64, speed=4)
    _run("cache", "--model", wan, "--videos", clips, "--out", root / "cache", "--frames", 9, "--height", 32,
         "--width", 32, "--dtype", "float32")
    world = WanData(WanWorldConfig(model=str(wan), data=str(root / "cache")))
    return {"root": root, "wan": wan, "cache": root / "cache", "world": world}


def _teacher(tiny, guidance=3.0):
    base = zoo.velocity_network("wan", None, {"folder": str(tiny["wan"])}).eval()
    return Sampler("teacher Euler", base, guidance, "euler")


def test_eval_set_is_the_caches_prompts_in_order_with_seeded_noises(tiny):
    world, cache = tiny["world"], tiny["world"].cache
    ev = world.eval_set(5, seed=7)
    assert ev.noise.shape == (5, 3, 16, 4, 4) and ev.cond.shape == (5, 512, cache.text_dim)
    captions = cache.captions
    assert ev.meta == [captions[0], captions[1], captions[2], captions[0], captions[1]]   # cycled
    for i in range(5):
        e = cache.embedding(i % 3)
        assert torch.equal(ev.cond[i, :e.shape[0]], e) and not ev.cond[i, e.shape[0]:].any()
    expected = torch.randn((5, 3, 16, 4, 4), generator=torch.Generator().manual_seed(7))
    assert torch.equal(ev.noise, expected)
    assert not torch.equal(ev.noise[0], ev.noise[3])            # a repeated prompt gets a new noise
    again = world.eval_set(5, seed=7)
    assert torch.equal(again.noise, ev.noise) and torch.equal(again.cond, ev.cond)
    assert not torch.equal(world.eval_set(5, seed=8).noise, ev.noise)
    with pytest.raises(UsageError, match="n >= 1"):
        world.eval_set(0, seed=7)


def test_decoding_undoes_the_caches_normalisation(tiny):
    from anystep.data.encode import encode_videos

    vae = load_vae(tiny["wan"])
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1   # (B, 3, F, H, W)
    latents = encode_videos(vae, video).permute(0, 2, 1, 3, 4)                                # normalised
    with torch.no_grad():
        raw = vae.encode(video).latent_dist.mean                                              # not normalised
        expected = vae.decode(raw, return_dict=False)[0].clamp(-1, 1).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(decode_latents(vae, latents, chunk=1), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="C=16"):
        decode_latents(vae, torch.zeros(1, 2, 3, 4, 4))


def test_reference_is_the_teachers_euler_sample_made_once_and_cached(tiny, tmp_path):
    world = tiny["world"]
    ev = world.eval_set(3, seed=1)
    teacher = _teacher(tiny)
    cache = tmp_path / "ref.safetensors"
    judge = reference_judge(world, teacher, ev, steps=3, shift=5.0, cache=cache)
    # the teacher's own sampler, called directly: 3 Euler steps with CFG 3 against the null prompt
    expected = sample_batched(teacher, world.null_cond, ev.noise, ev.cond, 3, 5.0)
    torch.testing.assert_close(judge.reference, expected)
    assert cache.is_file()
    one_by_one = sample_reference(world, teacher, ev, 3, 5.0, batch_size=1)   # batching changes nothing
    torch.testing.assert_close(one_by_one, expected, atol=1e-5, rtol=1e-5)

    class Refuses(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("the reference was sampled again instead of read from the cache")

    again = reference_judge(world, Sampler("teacher Euler", Refuses(), 3.0, "euler"), ev, steps=3, shift=5.0,
                            cache=cache)
    assert torch.equal(again.reference, judge.reference)
    for other, what in (({"ev": world.eval_set(3, seed=2)}, "eval_set"), ({"steps": 4}, "steps"),
                        ({"guidance": 1.0}, "guidance")):
        kwargs = {"ev": ev, "steps": 3, **other}
        sampler = Sampler("teacher Euler", Refuses(), other.get("guidance", 3.0), "euler")
        with pytest.raises(UsageError, match=f"another {what}"):
            reference_judge(world, sampler, kwargs["ev"], steps=kwargs["steps"], shift=5.0, cache=cache)


def test_teacher_judged_against_itself_agrees_exactly(tiny):
    world = tiny["world"]
    ev = world.eval_set(2, seed=3)
    teacher = _teacher(tiny)
    judge = reference_judge(world, teacher, ev, steps=2, shift=5.0)
    same = sample_batched(teacher, world.null_cond, ev.noise, ev.cond, 2, 5.0)
    scores = judge.score(same, ev)
    assert scores["teacher_latent_rmse"] == 0.0 and math.isinf(scores["teacher_psnr"])
    assert "clip_score" not in scores
    # a 1-step sample is not the 2-step one: a positive distance, the RMS of the latent difference by hand
    other = sample_batched(teacher, world.null_cond, ev.noise, ev.cond, 1, 5.0)
    far = judge.score(other, ev)
    by_hand = (other - same).pow(2).flatten(1).mean(1).sqrt().mean()
    assert far["teacher_latent_rmse"] == pytest.approx(float(by_hand), rel=1e-5)
    assert math.isfinite(far["teacher_psnr"])
    # flicker of the decoded samples, by hand: mean |frame_i+1 - frame_i| in 0..255
    videos = judge.decode(same)
    pixels = (videos + 1) * 127.5
    assert scores["flicker"] == pytest.approx(float((pixels[:, 1:] - pixels[:, :-1]).abs().mean()), rel=1e-4)


def test_real_path_settings_are_refused_elsewhere_and_checked():
    with pytest.raises(UsageError, match="sweep.clip is for the wan world"):
        sweep_settings(SweepConfig(), {"clip": "/tmp"}, "shapes")
    with pytest.raises(UsageError, match="teacher_steps is for the wan world"):
        sweep_settings(SweepConfig(), {"teacher_steps": 10}, "gmm")
    with pytest.raises(UsageError, match="unknown config key 'sweep.teacher_step'"):
        sweep_settings(SweepConfig(), {"teacher_step": 10}, "wan")
    with pytest.raises(UsageError, match="no such folder"):
        sweep_settings(SweepConfig(), {"clip": "/no/such/clip"}, "wan")
    assert sweep_settings(SweepConfig(), {"teacher_steps": 7, "steps": [1, 2]}, "wan").teacher_steps == 7


@pytest.fixture(scope="module")
def stage2(tiny):
    """A tiny-Wan Stage-2 LoRA run (1 step from a 1-step Stage 1; the teacher is the bare base), exported."""
    root = tiny["root"]
    world = [f"world.wan.model={tiny['wan']}", f"world.wan.data={tiny['cache']}"]
    s1, s2 = root / "runs" / "stage1", root / "runs" / "stage2"
    _run("stage1", "--config", "wan1.3b_stage1", *world, *LORA, "train.steps=1", f"train.out_dir={s1}")
    _run("stage2", "--config", "wan1.3b_stage2", *world, *LORA, "train.steps=1", "stage2.rollout_steps=[2]",
         "stage2.teacher=null", f"model.init={s1}", f"train.out_dir={s2}")
    _run("export", s2, "--out", root / "export", progress=True)
    return {"run": s2, "export": root / "export", "clip": tiny_clip_folder(root / "clip")}


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_of_a_tiny_wan_stage2_run_writes_table_plot_and_grid(tiny, stage2, capsys):
    out = tiny["root"] / "sweep"
    capsys.readouterr()
    _run("sweep", stage2["run"], "--steps", "1,2", "--num-samples", 2, "--out", out, "sweep.teacher_steps=2",
         f"sweep.clip={stage2['clip']}")
    printed = capsys.readouterr().out
    for name in ("sweep.md", "sweep.csv", "sweep.png", "grid.mp4", "teacher_reference.safetensors"):
        assert (out / name).is_file(), name
    rows = _rows(out / "sweep.csv")
    assert [(r["sampler"], r["N"]) for r in rows] == [("student", "1"), ("student", "2"),
                                                      ("teacher (base) Euler", "1"), ("teacher (base) Euler", "2")]
    assert set(rows[0]) == {"sampler", "N", "teacher_latent_rmse", "teacher_psnr", "flicker", "clip_score"}
    assert all(math.isfinite(float(r["teacher_latent_rmse"])) and float(r["flicker"]) >= 0 for r in rows)
    # the teacher's row at teacher_steps is the reference itself
    assert float(rows[3]["teacher_latent_rmse"]) == 0.0 and math.isinf(float(rows[3]["teacher_psnr"]))
    assert float(rows[0]["teacher_latent_rmse"]) > 0
    assert "teacher_latent_rmse" in printed and "grid.mp4" in printed
    # a wrong override is one clear error
    assert main(["sweep", str(stage2["run"]), "train.steps=3", "--no-progress"]) == 2
    assert "takes sweep.KEY=VALUE overrides" in capsys.readouterr().err


def test_sample_a_wan_run_writes_decoded_videos(tiny, stage2):
    out = tiny["root"] / "samples" / "s2"
    _run("sample", stage2["run"], "--steps", 2, "--num", 2, "--out", out, progress=True)
    import imageio.v2 as imageio

    # 9 decoded frames (not 3 latent frames of 4 x 4), each a row of 2 clips of 32 x 32 scaled 4x beside the
    # label column: the GIF's frames, and the PNG strip of them
    frames = imageio.mimread(out.with_suffix(".gif"))
    assert out.with_suffix(".mp4").is_file() and len(frames) == 9
    h, w = frames[0].shape[:2]
    assert h >= 128 and w >= 2 * 128
    strip = imageio.imread(out.with_suffix(".png"))
    assert strip.shape[:2] == (h, 9 * (w + 4))


def test_sweep_of_the_exported_folder_scores_as_the_run(tiny, stage2, capsys):
    run_out, out = tiny["root"] / "sweep_run", tiny["root"] / "sweep_export"
    common = ["--steps", "1,2", "--num-samples", 2, "sweep.teacher_steps=2"]
    _run("sweep", stage2["run"], "--out", run_out, *common)
    _run("sweep", stage2["export"], "--out", out, *common, f"world.wan.model={tiny['wan']}",
         f"world.wan.data={tiny['cache']}")
    ours, theirs = _rows(run_out / "sweep.csv"), _rows(out / "sweep.csv")
    assert [r["sampler"] for r in theirs] == [r["sampler"] for r in ours]
    for a, b in zip(ours, theirs):   # the merged EMA student in diffusers' class: the LoRA run's samples
        assert float(b["teacher_latent_rmse"]) == pytest.approx(float(a["teacher_latent_rmse"]), rel=1e-3, abs=1e-5)
    capsys.readouterr()
    assert main(["sweep", str(stage2["export"]), "--no-progress", f"world.wan.data={tiny['cache']}"]) == 2
    assert "world.wan.model" in capsys.readouterr().err
    assert main(["sweep", str(stage2["export"]), "--no-progress", f"world.wan.data={tiny['cache']}",
                 f"world.wan.model={stage2['export']}"]) == 2
    assert "the teacher is a Wan2.1 folder" in capsys.readouterr().err
    assert main(["sweep", str(stage2["run"]), "--no-progress", f"world.wan.data={tiny['cache']}"]) == 2
    assert "for sweeping exported folders" in capsys.readouterr().err


def test_sweep_of_a_causal_tiny_wan_student(tiny):
    """A causal (FAR) Stage-1 LoRA run samples chunk by chunk in the sweep, judged the same way."""
    root = tiny["root"]
    world = [f"world.wan.model={tiny['wan']}", f"world.wan.data={tiny['cache']}"]
    run, out = root / "runs" / "far1", root / "sweep_far"
    _run("stage1", "--config", "wanfar1.3b_stage1", *world, *LORA, "train.steps=1",
         "model.causal.chunk_partition=[1,2]", "model.causal.full_chunk_limit=2", f"train.out_dir={run}")
    _run("sweep", run, "--steps", "1,2", "--num-samples", 2, "--out", out, "sweep.teacher_steps=2")
    rows = _rows(out / "sweep.csv")
    assert [(r["sampler"], r["N"]) for r in rows][:2] == [("student", "1"), ("student", "2")]
    assert all(math.isfinite(float(r["teacher_latent_rmse"])) for r in rows[:2])
    assert (out / "grid.mp4").is_file()


def test_a_tiny_wan_run_validates_against_its_teacher_as_the_sweep_judges_its_checkpoint(tiny, tmp_path):
    """Validation during a tiny-Wan Stage-1 run writes its metrics and pictures at the configured steps, and
    the last one agrees with ``anystep sweep`` of the run's final checkpoint on the same evaluation set (the
    EMA student loaded from disk, the bare base as teacher: another path to the same numbers; in fp32, as the
    sweep samples, where the run would validate under its bf16 autocast)."""
    run = tmp_path / "s1"
    _run("stage1", "--config", "wan1.3b_stage1", f"world.wan.model={tiny['wan']}", f"world.wan.data={tiny['cache']}",
         *LORA, "model.base_dtype=float32", "train.mixed_precision=fp32", "train.steps=3", "optim.student.lr=1e-3", "optim.student.warmup_steps=1", "ema.warmup_steps=1",
         "validation.every=2", "validation.num_samples=2", "validation.steps=[1,2]", "sweep.teacher_steps=4",
         f"train.out_dir={run}")
    folder = run / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002", "step_000003", "teacher_reference.safetensors"]
    report = json.loads((folder / "step_000003" / "metrics.json").read_text())
    assert report["primary_metric"] == "teacher_latent_rmse" and (folder / "step_000003" / "grid.mp4").is_file()
    with open(run / "metrics.csv") as f:
        logged = {r["step"]: r for r in csv.DictReader(f)}
    assert float(logged["3"]["val/N2/teacher_latent_rmse"]) == pytest.approx(report["rows"][1]["teacher_latent_rmse"])
    _run("sweep", run, "--steps", "1,2", "--num-samples", 2, "--seed", 4321, "sweep.teacher_steps=4",
         "--out", tmp_path / "sweep")
    with open(tmp_path / "sweep" / "sweep.csv") as f:
        swept = [r for r in csv.DictReader(f) if r["sampler"] == "student"]
    assert [int(r["N"]) for r in swept] == [1, 2]
    for row, mine in zip(swept, report["rows"]):
        for metric in ("teacher_latent_rmse", "teacher_psnr", "flicker"):
            assert float(row[metric]) == pytest.approx(mine[metric], rel=1e-4, abs=1e-6), metric
