"""The causal (FAR) path: teacher-forcing split and Stage-1 objective, the chunk-by-chunk self-rollout (T2V,
I2V, V2V) and its backward simulation, our sampler against diffusers' AnyFlowFARPipeline, and the tiny causal
chain on a tiny Wan2.1 folder: cache -> causal Stage 1 -> causal Stage 2 -> export -> AnyFlowFARPipeline at 1 and
4 steps, T2V and I2V."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anystep.backward_simulation import RolloutPlan, flowmap_segments
from anystep.causal import (
    CausalFlowMap,
    TeacherForcing,
    causal_backward_simulation,
    chunks_covering,
    draw_num_chunks,
    is_causal,
    sample_causal,
    teacher_forcing_split,
)
from anystep.cli import main
from anystep.models.far import CausalStudent, far_student_from_wan
from anystep.models.far_attention import set_causal_attention
from anystep.models.wan import tiny_wan
from anystep.objectives.causal_flowmap import CausalStage1Objective
from anystep.objectives.flowmap import Stage1Config

PARTITION = (1, 2, 2, 2)     # 7 frames; full_chunk_limit 3 -> up to one compressed chunk


def _student(seed=0, partition=PARTITION):
    torch.manual_seed(seed)
    wan = tiny_wan(in_channels=4, text_dim=16, heads=2, head_dim=8, layers=2, ffn_dim=32, rope_max_seq_len=32)
    return CausalStudent(far_student_from_wan(wan, chunk_partition=partition, attention="dense"))


def test_teacher_forcing_split_follows_the_official_layout():
    x0 = torch.arange(7.0).view(1, 7, 1, 1, 1).expand(2, 7, 1, 2, 2)
    ctx, tgt = teacher_forcing_split(x0, PARTITION, 4, 3)
    assert ctx[0, :, 0, 0, 0].tolist() == [0.0] and tgt[0, :, 0, 0, 0].tolist() == [1, 2, 3, 4, 5, 6]
    ctx, tgt = teacher_forcing_split(x0, PARTITION, 3, 3)          # K = 3: no context, chunk 0 is a target
    assert ctx is None and tgt[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="covers"):
        teacher_forcing_split(x0[:, :6], PARTITION, 3, 3)


def test_number_of_chunks_is_limit_or_uniform_long_context():
    g = torch.Generator().manual_seed(0)
    assert {draw_num_chunks(8, 3, 0.0, g) for _ in range(50)} == {3}
    draws = [draw_num_chunks(8, 3, 1.0, g) for _ in range(3000)]
    counts = np.bincount(draws, minlength=9)[3:]
    assert set(draws) == set(range(3, 9)) and counts.min() > 400          # U{3..8}
    half = [draw_num_chunks(8, 3, 0.5, g) for _ in range(4000)]
    assert abs(np.mean(np.array(half) == 3) - (0.5 + 0.5 / 6)) < 0.03     # P(K = 3) ~ 0.58 (reference 5.4)


def test_chunks_covering():
    assert chunks_covering(PARTITION, 5) == (1, 2, 2)
    with pytest.raises(ValueError, match="whole number of chunks"):
        chunks_covering(PARTITION, 4)


def test_a_causal_student_is_a_causal_flow_map_and_refuses_a_plain_prompt():
    """Causal is the student's model type: the full fine-tune's student and a LoRA role of a FAR base are both a
    CausalFlowMap, and both refuse a plain text tensor (full attention is ``.bidirectional``)."""
    from anystep.models.roles import SharedBase

    student = _student()
    shared = SharedBase(_student(seed=1).transformer, rank=4)
    lora = shared.role("student")
    x, t, text = torch.randn(2, 5, 4, 4, 4), torch.tensor([900.0, 500.0]), torch.randn(2, 5, 16)
    for s in (student, lora):
        assert isinstance(s, CausalFlowMap) and is_causal(s) and s.chunk_partition == PARTITION
        with pytest.raises(TypeError, match="TeacherForcing"):
            s(x, t, t, text)
        assert s.bidirectional(torch.randn(2, 7, 4, 4, 4), t, t, text).shape == (2, 7, 4, 4, 4)
    assert not is_causal(shared.role("critic"))


@pytest.mark.parametrize("seed,chunks", [(0, 4), (3, 3)])   # with compressed context (K = 4) and without
def test_causal_stage1_every_call_sees_the_same_context_and_clean_copies(seed, chunks):
    student = _student()
    seen = []
    original = student.forward

    def spy(x, t, r, cond):
        seen.append((x.shape[0], cond))
        return original(x, t, r, cond)

    student.forward = spy
    b = 3
    x0 = torch.randn(b, 7, 4, 4, 4)
    text = torch.randn(b, 5, 16)
    objective = CausalStage1Objective(Stage1Config(long_context_ratio=1.0, bidirectional_prob=0.0),
                                      torch.zeros(1, 5, 16))
    g = torch.Generator().manual_seed(seed)
    loss, stats = objective(student, x0, text, g)
    loss.backward()
    k = int(stats["causal/chunks"])
    assert k == chunks
    ctx, tgt = teacher_forcing_split(x0, PARTITION, k, 3)
    assert len(seen) == 2                                     # the grad call and one batched no-grad call
    assert torch.equal(seen[0][1].clean, tgt)                # the student's call: its own clips' copies
    for batch, cond in seen:                                   # every row (null branch, t +- eps) is a clip's
        assert isinstance(cond, TeacherForcing)
        for key, ref in (("clean", tgt), ("context", ctx)):
            if ref is None:
                assert getattr(cond, key) is None
                continue
            rows = getattr(cond, key).flatten(1)
            assert rows.shape[0] == batch
            assert (torch.cdist(rows, ref.flatten(1)).min(1).values == 0).all()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g_).all() for g_ in grads)


def test_a_dropped_prompt_keeps_its_clips_context():
    b = 3
    x0 = torch.randn(b, 7, 4, 4, 4)
    ctx, tgt = teacher_forcing_split(x0, PARTITION, 4, 3)
    text = torch.randn(b, 5, 16)
    cond, null = TeacherForcing(text, tgt, ctx), TeacherForcing(torch.zeros(1, 5, 16), tgt, ctx)
    keep = torch.tensor([True, False, True])
    dropped = cond.select(keep, null)
    assert torch.equal(dropped.clean, tgt) and torch.equal(dropped.context, ctx)
    assert torch.equal(dropped.text[keep], text[keep]) and (dropped.text[1] == 0).all()
    rows = cond.cat(cond).take_rows(torch.tensor([4, 0]))
    assert torch.equal(rows.clean, tgt[[1, 0]]) and torch.equal(rows.context, ctx[[1, 0]])


class _Spy:
    """A stand-in FAR student: records cache prefills and calls; u = x (so each step shrinks x)."""

    def __init__(self, partition):
        self.chunk_partition, self.full_chunk_limit = partition, 3
        self.prefills, self.calls = [], []

    def cache(self):
        spy = self

        class Cache:
            def prefill(self, prefix, text, partition):
                assert not prefix.requires_grad          # the cache is the rollout's *detached* output
                spy.prefills.append((prefix.clone(), list(partition)))

            def __call__(self, x, t, r, text):
                spy.calls.append((x.shape[1], float(t[0]), float(r[0])))
                return x
        return Cache()


def test_self_rollout_prefills_the_detached_prefix_after_every_chunk():
    spy = _Spy(PARTITION)
    noise = torch.randn(2, 7, 1, 2, 2)
    out = sample_causal(spy, noise, torch.zeros(2, 1, 1), steps=4)
    assert [p for _, p in spy.prefills] == [[1], [1, 2], [1, 2, 2]]
    for prefix, _ in spy.prefills:                     # the cache holds the rollout's own output
        assert torch.equal(prefix, out[:, :prefix.shape[1]])
    assert len(spy.calls) == 4 * len(PARTITION)        # the N-step sampler per chunk


@pytest.mark.parametrize("given_frames,generated", [(1, 3), (3, 2)])
def test_i2v_and_v2v_keep_the_given_chunks(given_frames, generated):
    spy = _Spy(PARTITION)
    noise = torch.randn(2, 7, 1, 2, 2)
    given = torch.randn(2, given_frames, 1, 2, 2)
    out = sample_causal(spy, noise, torch.zeros(2, 1, 1), steps=2, given=given)
    assert torch.equal(out[:, :given_frames], given)
    assert len(spy.calls) == 2 * generated
    with pytest.raises(ValueError, match="whole number of chunks"):
        sample_causal(spy, noise, torch.zeros(2, 1, 1), steps=2, given=torch.randn(2, 2, 1, 2, 2))  # not chunks


def test_causal_backward_simulation_calls_and_gradients_per_chunk():
    spy = _Spy(PARTITION)
    plan = RolloutPlan(n=4, k=1)
    noise = torch.randn(1, 7, 1, 2, 2, requires_grad=True)
    x = causal_backward_simulation(spy, noise, torch.zeros(1, 1, 1), plan)
    assert x.requires_grad and len(spy.prefills) == len(PARTITION) - 1
    expected = [(t, r) for t, r, _ in flowmap_segments(plan)]
    assert [(t, r) for _, t, r in spy.calls] == [pytest.approx(e) for e in expected] * len(PARTITION)

    student = _student()
    noise = torch.randn(2, 7, 4, 4, 4, requires_grad=True)
    x = causal_backward_simulation(student, noise, torch.randn(2, 5, 16), plan)
    x[:, -2:].pow(2).sum().backward()                  # the last chunk only: its own calls carry gradient
    assert student.transformer.proj_out.weight.grad.abs().sum() > 0
    assert noise.grad[:, -2:].abs().sum() > 0 and noise.grad[:, :-2].abs().sum() == 0   # the cache is detached


def test_our_causal_sampler_equals_diffusers_anyflow_far_pipeline(tmp_path):
    from diffusers import AnyFlowFARPipeline, FlowMapEulerDiscreteScheduler

    from anystep.models.tiny_folder import tiny_wan_components

    parts = tiny_wan_components(seed=1)
    partition = [1, 1, 1, 2]                                  # 17 frames -> 5 latent frames
    far = far_student_from_wan(parts["transformer"], chunk_partition=partition).eval()
    pipe = AnyFlowFARPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                              transformer=far, scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    set_causal_attention(pipe.transformer, "dense")
    student = CausalStudent(far)
    text, _ = pipe.encode_prompt("a red block moving right", do_classifier_free_guidance=False)
    noise = torch.randn(1, 5, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    for n in (1, 4):
        theirs = pipe(prompt_embeds=text, height=32, width=32, num_frames=17, num_inference_steps=n,
                      latents=noise.permute(0, 2, 1, 3, 4).clone(), output_type="latent",
                      chunk_partition=partition).frames
        ours = sample_causal(student, noise.clone(), text, steps=n)
        theirs = theirs if theirs.shape == ours.shape else theirs.permute(0, 2, 1, 3, 4)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ the chain
def _run(*argv, progress=False):
    assert main([*map(str, argv), *([] if progress else ["--no-progress"])]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_tiny_causal_chain_exports_to_anyflow_far_pipeline(tmp_path, lora, capsys):
    from diffusers import AnyFlowFARPipeline

    from anystep.models.tiny_folder import build_tiny_wan_folder, write_tiny_clips

    wan = build_tiny_wan_folder(tmp_path / "wan")
    _run("cache", "--model", wan, "--videos", write_tiny_clips(tmp_path / "clips"), "--out", tmp_path / "cache",
         "--frames", 17, "--height", 32, "--width", 32, "--dtype", "float32")
    common = [f"world.wan.model={wan}", f"world.wan.data={tmp_path / 'cache'}", f"model.lora_rank={lora}",
              "model.base_dtype=float32", "train.mixed_precision=fp32", "train.gradient_checkpointing=false",
              "train.batch_size=2"]
    _run("stage1", "--config", "wan1.3b_stage1", *common, "model.causal.chunk_partition=[1,1,1,2]",
         "optim.student.warmup_steps=1", "train.steps=2", f"train.out_dir={tmp_path / 's1'}")
    _run("stage2", "--config", "wan1.3b_stage2", *common, "train.steps=2", "stage2.teacher=null",
         "stage2.rollout_steps=[2]", f"model.init={tmp_path / 's1'}", f"train.out_dir={tmp_path / 's2'}")
    capsys.readouterr()
    _run("export", tmp_path / "s2", "--out", tmp_path / "export", progress=True)
    printed = capsys.readouterr().out      # the load hint names the causal pipeline and the patch
    assert "from diffusers import AnyFlowFARPipeline" in printed and "anystep.patch_far_pipeline" in printed
    pipe = AnyFlowFARPipeline.from_pretrained(tmp_path / "export")
    if lora:   # the student's compressed patch embedding trains fully beside its adapter, and is exported
        from safetensors.torch import load_file
        saved = load_file(tmp_path / "s2" / "checkpoints" / "step_000002" / "student.safetensors")
        assert "far_patch_embedding.weight" in saved and any("lora_A" in k for k in saved)
        torch.testing.assert_close(pipe.transformer.far_patch_embedding.weight,
                                   load_file(tmp_path / "s2" / "checkpoints" / "step_000002" /
                                             "student_ema.safetensors")["far_patch_embedding.weight"])
    set_causal_attention(pipe.transformer, "dense")          # diffusers' flex path has no CPU backward; forward ok
    first = torch.rand(1, 1, 3, 32, 32)                      # I2V: one pixel frame = latent chunk 0
    for n in (1, 4):
        for video in (None, first):
            out = pipe("a red block moving right", video=video, height=32, width=32, num_frames=17,
                       num_inference_steps=n, chunk_partition=[1, 1, 1, 2], output_type="np",
                       generator=torch.Generator().manual_seed(0)).frames
            assert out.shape == (1, 17, 32, 32, 3) and np.isfinite(out).all()


def test_causal_world_sweep_reports_the_late_chunk_gap():
    from anystep.worlds.shapes import CAUSAL_PARTITION, ShapesData, causal_config

    world = ShapesData(causal_config())
    judge, ev = world.judge(), world.eval_set(8, 0)
    clips, ev.meta = world.world.sample(8, torch.Generator().manual_seed(0))
    real = judge.score(clips, ev, 1.0, CAUSAL_PARTITION)
    assert abs(real["late_gap"]) < 1e-5 and real["early_quality"] > 0.99
    assert "late_gap" not in judge.score(clips, ev, 1.0)        # no causal student: no per-chunk scores
    late = clips.clone()
    late[:, 5:] += 0.3 * torch.randn(late[:, 5:].shape, generator=torch.Generator().manual_seed(1))
    bad = judge.score(late, ev, 1.0, CAUSAL_PARTITION)
    assert bad["early_quality"] > 0.99 and bad["late_gap"] > 0.2


@pytest.mark.slow
def test_causal_shapes_stage1_then_sample_i2v_and_sweep(tmp_path, capsys):
    world = ["world.shapes.frames=9", "world.shapes.speed=1.0", "model.causal.chunk_partition=[1,2,2,2,2]"]
    _run("stage1", "--config", "shapes_stage1", *world, "train.steps=2", "train.batch_size=4",
         f"train.out_dir={tmp_path / 's1'}")
    assert main(["sample", str(tmp_path / "s1"), "--steps", "2", "--num", "2", "--given-frames", "1",
                 "--out", str(tmp_path / "i2v")]) == 0
    assert (tmp_path / "i2v.mp4").is_file()
    _run("sweep", tmp_path / "s1", "--steps", "1,2", "--num-samples", "4", "--teacher", "shipped:shapes_teacher")
    table = capsys.readouterr().out
    assert "late_gap" in table and "| student | 2 |" in table and "| teacher Euler | 2 |" in table


@pytest.mark.parametrize("preset", ["shapes_far_stage1", "shapes_far_stage2"])
def test_causal_world_presets_start_from_the_shipped_causal_teacher(preset):
    from anystep.config import resolve
    from anystep.lineage import nearest_teacher, open_run
    from anystep.recipes import load_model
    from anystep.worlds.shapes import CAUSAL_PARTITION

    cfg = resolve(preset)
    assert cfg.kind == "stage2" or cfg.model.causal.chunk_partition == CAUSAL_PARTITION
    spec = cfg.model.init if cfg.kind == "stage1" else cfg.stage2.teacher
    _teacher, tcfg, _ = load_model(spec)
    assert tcfg.world.shapes == cfg.world.shapes and nearest_teacher(open_run(spec)).spec == spec


def test_a_causal_layout_that_does_not_cover_the_clips_is_refused_before_training(tmp_path):
    from anystep.config import resolve
    from anystep.errors import UsageError
    from anystep.recipes import build_trainer

    with pytest.raises((UsageError, ValueError), match="covers"):
        build_trainer(resolve("shapes_far_stage1", ["model.causal.chunk_partition=[1,4,3]", "train.steps=1",
                                                    f"train.out_dir={tmp_path}"]))


def test_bidirectional_flow_matching_term_is_added_with_its_probability():
    student = _student()
    x0, text = torch.randn(2, 7, 4, 4, 4), torch.randn(2, 5, 16)
    losses = {}
    for prob in (0.0, 1.0):
        objective = CausalStage1Objective(Stage1Config(bidirectional_prob=prob), torch.zeros(1, 5, 16))
        losses[prob] = objective(student, x0, text, torch.Generator().manual_seed(0))
    (l0, s0), (l1, s1) = losses[0.0], losses[1.0]
    assert "loss/bidirectional" not in s0 and s1["loss/bidirectional"] > 0
    torch.testing.assert_close(l1 - l0, torch.as_tensor(s1["loss/bidirectional"]), atol=1e-6, rtol=1e-5)
