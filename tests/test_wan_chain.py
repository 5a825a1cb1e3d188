"""The real Wan2.1 path end to end on a tiny random Wan2.1 folder, offline, through the CLI:
cache -> teacher fine-tune (LoRA) -> Stage 1 (LoRA on the raw model) -> Stage 2 (student, critic, LoRA teacher
on one frozen base) -> export -> diffusers' AnyFlowPipeline at 1 and 4 steps. Plus import, synthesize with a
trained teacher, the presets and the errors a user meets first."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anystep.cli import main
from anystep.config import resolve
from anystep.models.folder import load_transformer
from anystep.models.tiny_folder import build_tiny_wan_folder, write_tiny_clips
from anystep.models.wan import student_from_wan, wan_from_student
from anystep.recipes import build_trainer, load_model, report, teacher_transformer

pytestmark = pytest.mark.slow     # a chain of real-path runs (cache, teacher, Stage 1, Stage 2, export)

LORA = ["model.lora_rank=4", "model.lora_alpha=8", "train.batch_size=2", "train.log_every=1"]


def _run(*argv, progress=False):
    assert main([*map(str, argv), *([] if progress else ["--no-progress"])]) == 0


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_chain")
    wan = build_tiny_wan_folder(root / "wan")
    clips = write_tiny_clips(root / "clips", n=4, frames=9, height=48, width=64, speed=4)
    _run("cache", "--model", wan, "--videos", clips, "--out", root / "cache", "--frames", 5,
         "--height", 32, "--width", 32, "--dtype", "float32")
    world = [f"world.wan.model={wan}", f"world.wan.data={root / 'cache'}"]
    runs = {k: root / "runs" / k for k in ("teacher", "stage1", "stage2")}
    # large learning rates, so that every trained adapter (and Stage 2's EMA) differs visibly from its start
    _run("teacher", "--config", "wan1.3b_teacher", *world, *LORA, "train.steps=3", "train.mixed_precision=bf16",
         "optim.teacher.lr=1e-2", "optim.teacher.warmup_steps=1", f"train.out_dir={runs['teacher']}")
    _run("stage1", "--config", "wan1.3b_stage1", *world, *LORA, "train.steps=3", "optim.student.lr=1e-2",
         "optim.student.warmup_steps=1", f"train.out_dir={runs['stage1']}")
    _run("stage2", "--config", "wan1.3b_stage2", *world, *LORA, "train.steps=2", "stage2.rollout_steps=[2,4]",
         "optim.student.lr=1e-2", "optim.critic.lr=1e-2", "ema.warmup_steps=0", f"model.init={runs['stage1']}",
         f"stage2.teacher={runs['teacher']}", f"train.out_dir={runs['stage2']}")
    _run("export", runs["stage2"], "--out", root / "export", progress=True)
    return dict(root=root, wan=wan, world=world, export=root / "export", **runs)


def _inputs(model_cfg, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 16, 4, 4, generator=g)   # (B, F, C, H, W) latents of 5 x 32 x 32 clips
    text = torch.randn(batch, 7, 32, generator=g)
    return x, torch.tensor([900.0, 400.0]), torch.tensor([300.0, 0.0]), text


def test_exported_folder_samples_in_anyflow_pipeline_at_1_and_4_steps(chain):
    from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    pipe = AnyFlowPipeline.from_pretrained(chain["export"])
    assert isinstance(pipe.scheduler, FlowMapEulerDiscreteScheduler) and pipe.scheduler.config.shift == 5.0
    for n in (1, 4):
        video = pipe("a red block moving right", height=32, width=32, num_frames=5, num_inference_steps=n,
                     output_type="np", generator=torch.Generator().manual_seed(0)).frames
        assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()


def test_export_is_the_stage2_students_ema(chain):
    from diffusers import AnyFlowTransformer3DModel

    student, cfg, _ = load_model(str(chain["stage2"]))          # the EMA adapter on the frozen base
    exported = AnyFlowTransformer3DModel.from_pretrained(chain["export"], subfolder="transformer").eval()
    x, t, r, text = _inputs(cfg)
    with torch.no_grad():
        ours = student(x, t, r, text)
        theirs = exported(hidden_states=x, timestep=t[:, None].expand(-1, 2), r_timestep=r[:, None].expand(-1, 2),
                          encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_the_python_api_samples_and_saves_real_path_latents(chain, tmp_path):
    """anystep.load on a wan student: its flow map on your own noise and prompt embeddings, saved as latents;
    samples drawn for raw embeddings cannot be judged (they are for your own metric)."""
    import anystep
    from anystep.errors import UsageError

    model = anystep.load(str(chain["stage2"]))
    x, _, _, text = _inputs(model.config)
    s = model.sample(steps=1, noise=x, cond=text)
    with torch.no_grad():   # N = 1: one jump from t = 1000 to r = 0
        u = model.network(x, torch.full((2,), 1000.0), torch.zeros(2), text)
    assert torch.allclose(s.x, x - u, atol=1e-5)
    assert (s.content, s.labels, s.meta) == ("latents", None, None)   # raw embeddings: no prompts known
    back = anystep.load_samples(s.save(tmp_path / "wan.safetensors"))
    assert torch.equal(back.x, s.x) and torch.equal(back.cond, text) and back.content == "latents"
    with pytest.raises(UsageError, match="no judge|raw cond"):
        model.score(s)


def test_bf16_base_keeps_float32_adapters(chain):
    cfg = resolve(str(chain["stage2"] / "config.yaml"), ["train.steps=1"])
    assert cfg.model.base_dtype == "bfloat16"      # the preset's (official bf16 parameters)
    student = build_trainer(cfg, progress=False).method.roles["student"]
    assert student.shared.base.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_student_delta_embedder_trains_and_is_saved(chain):
    saved = load_file(chain["stage1"] / "checkpoints" / "step_000003" / "student_ema.safetensors")
    delta_b = [v for k, v in saved.items() if "delta_embedder" in k and "lora_B" in k]
    assert len(delta_b) == 2 and all(v.abs().max() > 0 for v in delta_b)   # lora_B starts at 0


def test_all_roles_share_the_raw_wan_base_and_the_teacher_is_the_teacher_run(chain):
    cfg = resolve(str(chain["stage2"] / "config.yaml"), ["train.steps=1", "model.base_dtype=float32"])
    trainer = build_trainer(cfg, progress=False)
    student, critic = trainer.method.roles["student"], trainer.method.roles["critic"]
    teacher = trainer.method.teacher
    assert student.shared is critic.shared is teacher.shared
    raw = student_from_wan(load_transformer(chain["wan"])).state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in student.shared.base.state_dict().items() if "lora_" not in k}
    assert base.keys() == raw.keys() and all(torch.equal(base[k], raw[k]) for k in raw)
    x, t, r, text = _inputs(cfg)
    with torch.no_grad():
        run_teacher, _, _ = load_model(str(chain["teacher"]))
        expected = run_teacher(x, t, t, text)
        torch.testing.assert_close(teacher(x, t, t, text), expected)
        torch.testing.assert_close(critic(x, t, t, text), expected)     # the critic starts as the teacher
        stage1, _, _ = load_model(str(chain["stage1"]))
        start = stage1(x, t, r, text)
        torch.testing.assert_close(student(x, t, r, text), start)       # the student starts as Stage 1's EMA
        # both trained adapters matter: the bare raw-Wan base gives other outputs
        for tr, trained in ((t, expected), (r, start)):
            with teacher.shared.using(None):
                bare = teacher.shared.base(hidden_states=x, timestep=t[:, None].expand(-1, 2),
                                           r_timestep=tr[:, None].expand(-1, 2), encoder_hidden_states=text,
                                           return_dict=False)[0]
            assert (bare - trained).abs().max() > 1e-3
        # the merged teacher as a plain diffusers Wan transformer: the same velocity (for WanPipeline)
        wan = teacher_transformer(str(chain["teacher"]), str(chain["wan"])).eval()
        plain = wan(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=t, encoder_hidden_states=text,
                    return_dict=False)[0].permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=1e-4)


def test_import_a_released_anyflow_folder_and_continue_training(chain):
    out = chain["root"] / "runs" / "imported"
    world = [f"world.wan.model={chain['export']}", f"world.wan.data={chain['root'] / 'cache'}"]
    cfg = resolve("wan1.3b_stage2", [*world, *LORA, "model.init=null", "stage2.teacher=null", "train.steps=1",
                                     "model.base_dtype=float32",
                                     "stage2.rollout_steps=[2]", f"train.out_dir={out}"])
    trainer = build_trainer(cfg, progress=False)
    from diffusers import AnyFlowTransformer3DModel

    released = AnyFlowTransformer3DModel.from_pretrained(chain["export"], subfolder="transformer").eval()
    x, t, r, text = _inputs(cfg)
    with torch.no_grad():
        start = trainer.method.roles["student"](x, t, r, text)
        expected = released(hidden_states=x, timestep=t[:, None].expand(-1, 2), r_timestep=r[:, None].expand(-1, 2),
                            encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(start, expected)     # the student starts as the released model
    trainer.fit()
    assert (out / "checkpoints" / "step_000001" / "student.safetensors").is_file()


def test_synthesize_with_the_trained_teacher_then_train_on_it(chain, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red block moving right\na blue disk moving left\n")
    _run("synthesize", "--model", chain["wan"], "--prompts", prompts, "--teacher", chain["teacher"], "--out",
         tmp_path / "synth", "--steps", 2, "--frames", 5, "--height", 32, "--width", 32, "--dtype", "float32")
    index = json.loads((tmp_path / "synth" / "index.json").read_text())
    assert index["source"] == "teacher" and sum(s["count"] for s in index["shards"]) == 2
    _run("stage1", "--config", "wan1.3b_stage1", f"world.wan.model={chain['wan']}",
         f"world.wan.data={tmp_path / 'synth'}", *LORA, "train.steps=1", f"train.out_dir={tmp_path / 's1'}")


@pytest.mark.parametrize("preset", ["wan1.3b_teacher", "wan1.3b_stage1", "wan1.3b_stage2",
                                    "wan14b_teacher", "wan14b_stage1", "wan14b_stage2",
                                    "wanfar1.3b_stage1", "wanfar1.3b_stage2", "wanfar14b_stage1", "wanfar14b_stage2"])
def test_presets_resolve_to_the_official_recipe(preset, capsys):
    kind = preset.split("_")[1]
    assert main([kind, "--config", preset, "--dry-run"]) == 0
    cfg = resolve(preset)
    assert (cfg.model.lora_rank, cfg.model.lora_alpha) == (256, 256)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing
    big = "14b" in preset
    # the official global batch (b32 / b16), 2 / 1 rows per GPU: 16 GPUs without accumulation, 1 GPU with 16
    assert (cfg.train.batch_size, cfg.train.micro_batch_size) == ((16, 1) if big else (32, 2))
    assert cfg.train.accumulation(16) == 1 and cfg.train.accumulation(8) == 2 and cfg.train.accumulation(1) == 16
    c = cfg.model.causal
    assert (c is not None) == (preset.startswith("wanfar") and kind == "stage1")   # Stage 2: model.init's student
    if c is not None:
        assert (c.chunk_partition, c.full_chunk_limit, c.compressed_patch_size) == ((1, 3, 3, 3, 3, 3, 3, 2), 3, (1, 4, 4))
    if kind != "teacher":
        assert (cfg.stage1.long_context_ratio, cfg.stage1.bidirectional_prob) == (0.5, 0.1 if kind == "stage1" else 0.0)
    if kind == "stage2":
        for o in cfg.optim.values():
            assert (o.lr, o.betas, o.warmup_steps, o.grad_clip) == (2e-6, (0.0, 0.999), 0, 1.0)
        assert (cfg.ema.decay, cfg.ema.warmup_steps) == (0.99, 200) and set(cfg.optim) == {"student", "critic"}
        assert cfg.train.steps == 1200 and cfg.stage2.dmd_batch_size == (16 if big else 32)
        assert cfg.stage2.real_guidance == 3.0 and cfg.stage2.rollout_steps == (2, 4, 8, 16, 50)
        assert (cfg.stage2.dmd_shift, cfg.stage2.critic_shift, cfg.stage2.effective_rollout_shift) == (5.0, 5.0, 5.0)
    else:
        o, = cfg.optim.values()
        assert (o.lr, o.betas, o.warmup_steps, cfg.ema.decay, cfg.ema.warmup_steps) == (5e-5, (0.9, 0.95), 1000,
                                                                                        0.999, 1000)
        assert cfg.train.steps == (4000 if big else 6000)
    if kind != "teacher":   # the Stage-1 loss (Stage 2 co-trains it): the official sampler and weighting
        assert (cfg.stage1.shift, cfg.stage1.rebalance_power) == (5.0, 1.0)
    assert "lora_rank: 256" in capsys.readouterr().out


def test_a_hub_id_fails_with_a_local_path_message(chain, capsys):
    code = main(["stage1", "--config", "wan1.3b_stage1", "world.wan.model=Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                 f"world.wan.data={chain['root'] / 'cache'}", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "local path" in err and "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err


def test_missing_cache_and_toy_export_are_clear_errors(chain, capsys, tmp_path):
    assert main(["stage1", "--config", "wan1.3b_stage1", f"world.wan.model={chain['wan']}",
                 f"world.wan.data={tmp_path / 'nothing'}", "--no-progress"]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["export", "shipped:shapes_teacher", "--out", str(tmp_path / "x")]) == 2
    assert "world.name=wan" in capsys.readouterr().err


def test_report_of_wan_runs_gives_an_export_command_that_works(chain, tmp_path):
    text = report(chain["stage2"]).markdown
    assert "world: **wan**" in text and "preset: `wan1.3b_stage2`" in text and "2 in the newest checkpoint" in text
    argv = shlex.split(re.search(r"^- export: `([^`]*)`", text, re.MULTILINE).group(1))
    assert argv[:3] == ["anystep", "export", str(chain["stage2"])]
    argv[argv.index("--out") + 1] = str(tmp_path / "exported")
    _run(*argv[1:], progress=True)
    assert json.loads((tmp_path / "exported" / "model_index.json").read_text())["_class_name"] == "AnyFlowPipeline"
    teacher = report(chain["teacher"]).markdown
    assert "preset: `wan1.3b_teacher`" in teacher
    assert "export: not for this run: it is a 'teacher' run sampled by 'euler'" in teacher


def test_wan_from_student_refuses_a_flowmap_student():
    student = student_from_wan(load_transformer_tiny())
    with torch.no_grad():
        student.condition_embedder.delta_embedder.linear_1.weight.add_(0.1)
    with pytest.raises(ValueError, match="delta embedder differs"):
        wan_from_student(student)


def load_transformer_tiny():
    from anystep.models.tiny_folder import tiny_wan_components
    return tiny_wan_components()["transformer"]
