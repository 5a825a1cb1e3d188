"""The causal (FAR) student (anystep.models.far) on a tiny Wan.

References are independent of the code under test: diffusers' Wan transformer and bidirectional AnyFlow
transformer (bidirectional mode), diffusers' own flex processor (the dense attention path), the attention
rules of the official code written out here from a per-token chunk index and kind (the mask), and plain
no-cache forwards (the KV-cache rollout).
"""

import pytest
import torch
from diffusers import AnyFlowFARTransformer3DModel, WanTransformer3DModel
from peft import LoraConfig

from anystep.causal import TeacherForcing
from anystep.models.far import bidirectional, far_student_from_wan, split_chunks, teacher_forced
from anystep.models.far_attention import FARAttnProcessor, dense_mask, set_causal_attention
from anystep.models.far_cache import ChunkCache
from anystep.models.wan import AnyFlowStudent, WanVelocity, student_from_wan

C, TEXT_DIM, H, W = 4, 32, 8, 8
PARTITION = [1, 2, 2, 2, 2]      # full_chunk_limit 3: chunks 0 and 1 (3 frames) are compressed context
T, R = torch.tensor([937.5, 312.5]), torch.tensor([833.3, 0.0])
ATOL = 1e-5
# diffusers' flex processor on CPU runs flex_attention eagerly (tests compare against it)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _wan(**extra) -> WanTransformer3DModel:
    torch.manual_seed(0)
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                in_channels=C, out_channels=C, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=64,
                                num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                rope_max_seq_len=32, **extra)
    with torch.no_grad():  # Wan zero-inits some layers; make every weight matter
        for p in wan.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return wan


def _far(partition=PARTITION, **kw) -> AnyFlowFARTransformer3DModel:
    return far_student_from_wan(_wan(), chunk_partition=partition, **kw)


def _video(frames: int, batch: int = 2, seed: int = 1, size: tuple[int, int] = (H, W)) -> torch.Tensor:
    return torch.randn(batch, frames, C, *size, generator=torch.Generator().manual_seed(seed))


def _text(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 5, TEXT_DIM, generator=torch.Generator().manual_seed(7))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:g} (scale {b.abs().max().item():.3g})"


# -------------------------------------------------------------------------------------------- building
def test_far_student_copies_the_wan_weights():
    wan = _wan()
    far = far_student_from_wan(wan, chunk_partition=PARTITION)
    assert tuple(far.config.compressed_patch_size) == (1, 4, 4)
    assert list(far.config.chunk_partition) == PARTITION and far.config.full_chunk_limit == 3
    state = far.state_dict()
    for key, value in wan.state_dict().items():
        assert torch.equal(state[key], value), key
    for key in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        assert torch.equal(state[f"condition_embedder.delta_embedder.{key}"],
                           wan.state_dict()[f"condition_embedder.time_embedder.{key}"])
    # the compressed kernel: the *Wan* kernel (1,2,2) trilinearly resized to (1,4,4) (align_corners=False:
    # output taps sit at input coordinates -0.25, 0.25, 0.75, 1.25, clamped), bias copied
    kernel = wan.patch_embedding.weight.detach()[:, :, 0]
    lerp = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    _close(far.far_patch_embedding.weight[:, :, 0], lerp @ kernel @ lerp.T, atol=1e-6)
    assert torch.equal(far.far_patch_embedding.bias, wan.patch_embedding.bias)


def test_far_student_from_anyflow_keeps_its_delta_embedder():
    student = student_from_wan(_wan())
    with torch.no_grad():
        student.condition_embedder.delta_embedder.linear_1.weight.mul_(1.5)
    far = far_student_from_wan(student, chunk_partition=[1, 2], compressed_patch_size=(1, 4, 4))
    assert torch.equal(far.condition_embedder.delta_embedder.linear_1.weight,
                       student.condition_embedder.delta_embedder.linear_1.weight)


def test_far_student_fails_loudly():
    with pytest.raises(ValueError, match="added_kv_proj_dim"):
        far_student_from_wan(_wan(added_kv_proj_dim=32, image_dim=32), chunk_partition=[1])
    wan = _wan()
    original = wan.state_dict
    wan.state_dict = lambda: {**original(), "blocks.0.attn2.add_k_proj.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="add_k_proj"):
        far_student_from_wan(wan, chunk_partition=[1])


# --------------------------------------------------------------------------------------- bidirectional
def test_bidirectional_is_the_wan_teacher_at_r_equal_t_and_the_anyflow_student_otherwise():
    wan = _wan()
    far = far_student_from_wan(wan, chunk_partition=[1, 2, 2, 2])
    x, text = _video(7), _text()
    with torch.no_grad():
        # Wan's RoPE is real cos/sin, FAR's complex float64: measured max error 8e-7 (outputs ~2.4)
        _close(bidirectional(far, x, T, T, text), WanVelocity(wan)(x, T, T, text))
        # same RoPE and SDPA as the bidirectional AnyFlow transformer: measured exactly equal
        anyflow = AnyFlowStudent(student_from_wan(wan))
        _close(bidirectional(far, x, T, R, text), anyflow(x, T, R, text), atol=1e-6)


# --------------------------------------------------------------------------------------- dense vs flex
def test_dense_attention_equals_flex_on_the_train_path():
    far = _far()
    n_comp, _ = split_chunks(far, PARTITION)
    fc = sum(PARTITION[:n_comp])
    assert n_comp == 2 and fc == 3
    clean, noisy, text = _video(sum(PARTITION)), _video(sum(PARTITION) - fc, seed=2), _text()
    outputs = {}
    with torch.no_grad():
        for backend in ("dense", "diffusers"):
            set_causal_attention(far, backend)
            u = teacher_forced(far, noisy, T, R, text, clean=clean[:, fc:], context=clean[:, :fc],
                               chunk_partition=PARTITION)
            outputs[backend] = (u, bidirectional(far, clean, T, R, text))
    assert outputs["dense"][0].shape == noisy.shape
    for dense, flex in zip(outputs["dense"], outputs["diffusers"], strict=True):
        _close(dense, flex)   # measured 7e-7


def test_dense_attention_equals_flex_on_the_cache_path():
    """Prefill (masked, flex) and cached chunk calls. Frames of 16 x 16 (64 tokens) in chunks of 2: the
    chunk is exactly 128 tokens, so diffusers' processor adds no zero key padding on the mask-less cache read
    (with padding it diverges from the official SDPA read, which FARAttnProcessor follows)."""
    far, partition = _far([2, 2, 2, 2]), [2, 2, 2, 2]
    clean, text = _video(8, size=(16, 16)), _text()
    results = {}
    for backend in ("dense", "diffusers"):
        set_causal_attention(far, backend)
        cache, outs = ChunkCache(far), []
        with torch.no_grad():
            for c in range(len(partition)):
                start = sum(partition[:c])
                if c:
                    cache.prefill(clean[:, :start], text, partition[:c])
                    outs += [kv for layer in cache._cache for kv in layer.values() if kv.numel()]
                outs.append(cache(_video(2, seed=10 + c, size=(16, 16)), T, R, text))
        results[backend] = outs
    assert any(kv.shape[3] == 2 * 16 for kv in results["dense"][:-1] if kv.ndim == 5)   # a compressed chunk
    for dense, flex in zip(results["dense"], results["diffusers"], strict=True):
        _close(dense, flex)   # measured 7e-7


# -------------------------------------------------------------------------------------------- the mask
CTX, NOISY, CLEAN, PAD = 0, 1, 2, 3


def _layout(partition, mode, limit=3, padded_to=None):
    """(chunk index, kind) per token of the sequence the FAR model builds: train: [compressed clean context |
    noisy full chunks | clean copies] with the newest ``limit`` chunks full; cache: [compressed | clean full]
    with the newest ``limit - 1`` full."""
    n_full = min(len(partition), limit if mode == "train" else limit - 1)
    n_comp = len(partition) - n_full
    full_tpf, comp_tpf = (H // 2) * (W // 2), (H // 4) * (W // 4)
    chunk, kind = [], []
    for c in range(n_comp):
        chunk += [c] * (partition[c] * comp_tpf)
        kind += [CTX] * (partition[c] * comp_tpf)
    for copy in ((NOISY, CLEAN) if mode == "train" else (CLEAN,)):
        for c in range(n_comp, len(partition)):
            chunk += [c] * (partition[c] * full_tpf)
            kind += [copy] * (partition[c] * full_tpf)
    if padded_to is not None:
        chunk += [0] * (padded_to - len(chunk))
        kind += [PAD] * (padded_to - len(kind))
    return torch.tensor(chunk), torch.tensor(kind)


def _rules(chunk, kind):
    """Official sec. 5.3: chunk-causal; no padding; no clean -> noisy; noisy -> noisy within the same chunk
    only; noisy -> clean copies of strictly earlier chunks only."""
    cq, ck, kq, kk = chunk[:, None], chunk[None, :], kind[:, None], kind[None, :]
    allowed = (cq >= ck) & (kq != PAD) & (kk != PAD)
    allowed &= ~((kq == CLEAN) & (kk == NOISY))
    allowed &= ~((kq == NOISY) & (kk == NOISY) & (cq != ck))
    allowed &= ~((kq == NOISY) & (kk == CLEAN) & (ck >= cq))
    return allowed


@pytest.mark.parametrize("partition",
                         [[3], [1, 2], [1, 2, 2], [1, 2, 2, 2], [1, 2, 2, 2, 2], [2, 1, 3, 1, 2, 2]])
def test_the_dense_mask_follows_the_official_rules(partition):
    far = _far(partition)
    processor = set_causal_attention(far, "dense")
    frames = sum(partition)
    n_comp, _ = split_chunks(far, partition)
    fc = sum(partition[:n_comp])
    clean, text = _video(frames, batch=1), _text(1)
    with torch.no_grad():
        teacher_forced(far, clean[:, fc:], T[:1], R[:1], text, clean=clean[:, fc:],
                       context=clean[:, :fc] if fc else None, chunk_partition=partition)
        assert torch.equal(processor.mask, _rules(*_layout(partition, "train")))
        processor.mask = None
        ChunkCache(far).prefill(clean, text, partition)
        if len(partition) > 1:
            assert torch.equal(processor.mask, _rules(*_layout(partition, "cache")))
        else:   # a one-chunk prefill masks nothing: SDPA without a mask (far_masks.allows_all)
            assert processor.mask is None
    # the padded BlockMask itself, padding included
    for mode, has_clean in (("train", True), ("cache", False)):
        block = far.build_attention_mask(chunk_partition=partition, height=H, width=W,
                                         has_clean_context=has_clean, mode=mode)
        length = block.seq_lengths[0]
        assert length % 128 == 0
        assert torch.equal(dense_mask(block, length), _rules(*_layout(partition, mode, padded_to=length)))


# ------------------------------------------------------------------------------------------- gradients
def test_backward_on_cpu_reaches_lora_and_the_compressed_patch_embedding():
    far = _far()   # attention "auto": dense on CPU
    assert isinstance(far.blocks[0].attn1.processor, FARAttnProcessor)
    far.requires_grad_(False)
    far.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn1.to_q", "attn1.to_k", "attn1.to_v",
                                                                  "attn1.to_out.0"]))
    with torch.no_grad():
        for name, p in far.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    far.far_patch_embedding.requires_grad_(True)
    trainable = [(n, p) for n, p in far.named_parameters() if p.requires_grad]
    clean, text = _video(sum(PARTITION)), _text()
    fc = 3
    u = teacher_forced(far, _video(6, seed=3), T, R, text, clean=clean[:, fc:], context=clean[:, :fc],
                       chunk_partition=PARTITION)
    u.square().mean().backward()
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        p.grad = None
    # the cached chunk call (backward simulation differentiates it); the cache itself is a constant
    cache = ChunkCache(far)
    cache.prefill(clean[:, :7], text, PARTITION[:-1])
    cache(_video(2, seed=4), T, R, text).square().mean().backward()
    for name, p in trainable:
        if "lora" in name:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert far.far_patch_embedding.weight.grad is None   # the chunk is full resolution, the cache constant


# --------------------------------------------------------------------------------------------- rollout
def test_kv_cache_rollout_equals_recomputing_the_prefix_without_a_cache():
    """For every chunk c: the cached call (prefix re-encoded at t = r = 0, compressed beyond the newest 2
    chunks) equals (1) the last noisy chunk of the teacher-forced forward with the prefix as compressed
    context and clean copies, and (2) the chunk-causal no-cache forward over [prefix | chunk c]."""
    far = _far()
    clean, text = _video(sum(PARTITION)), _text()
    cache = ChunkCache(far)
    with torch.no_grad():
        for c in range(len(PARTITION)):
            start, end = sum(PARTITION[:c]), sum(PARTITION[:c + 1])
            if c:
                cache.prefill(clean[:, :start], text, PARTITION[:c])
            chunk = _video(PARTITION[c], seed=20 + c)
            for t, r in ((T, R), (R + 50.0, R)):      # several calls per prefill (denoising steps)
                u = cache(chunk, t, r, text)
                n_comp, _ = split_chunks(far, PARTITION[:c + 1])
                fc = sum(PARTITION[:n_comp])
                # the earlier noisy chunks do not reach the last one: any values
                noisy = torch.cat([_video(start - fc, seed=30 + c), chunk], 1)
                ref = teacher_forced(far, noisy, t, r, text, clean=clean[:, fc:end],
                                     context=clean[:, :fc] if fc else None, chunk_partition=PARTITION[:c + 1])
                _close(u, ref[:, -PARTITION[c]:])   # measured <= 6e-7
                zeros = torch.zeros(2, start)
                plain = far(hidden_states=torch.cat([clean[:, :start], chunk], 1),
                            timestep=torch.cat([zeros, t[:, None].expand(2, PARTITION[c])], 1),
                            r_timestep=torch.cat([zeros, r[:, None].expand(2, PARTITION[c])], 1),
                            encoder_hidden_states=text, chunk_partition=PARTITION[:c + 1],
                            return_dict=False)[0]
                _close(u, plain[:, -PARTITION[c]:])


# ------------------------------------------------------------------------------------- teacher forcing
def test_teacher_forced_repeats_context_and_clean_for_a_stacked_batch():
    far = _far()
    clean, text = _video(sum(PARTITION), batch=1), _text(2)
    noisy = _video(6, batch=2, seed=5)
    with torch.no_grad():
        both = teacher_forced(far, noisy, T, R, text, clean=clean[:, 3:], context=clean[:, :3],
                              chunk_partition=PARTITION)
        for i in range(2):
            one = teacher_forced(far, noisy[i:i + 1], T[i:i + 1], R[i:i + 1], text[i:i + 1],
                                 clean=clean[:, 3:], context=clean[:, :3], chunk_partition=PARTITION)
            _close(both[i:i + 1], one)


def test_teacher_forced_checks_the_partition():
    far = _far()
    clean, text = _video(7), _text()
    with pytest.raises(ValueError, match="compressed context"):   # [1,2,2,2]: chunk 0 is context, not noisy
        teacher_forced(far, clean, T, R, text, clean=clean, chunk_partition=[1, 2, 2, 2])
    with pytest.raises(ValueError, match="clean version"):
        teacher_forced(far, clean[:, 1:], T, R, text, clean=clean[:, 2:], context=clean[:, :1],
                       chunk_partition=[1, 2, 2, 2])


def test_the_compressed_patch_embedding_keeps_fp32_master_weights_on_a_bf16_base():
    """A bf16 frozen base (the wanfar presets) with the student's fully trained compressed patch embedding:
    its weights, gradients and AdamW state are float32 (official: fp32 master weights, bf16 compute), so one
    AdamW step at the official lr 2e-6 moves (nearly) every entry; in bf16 most updates round away."""
    from anystep.models.roles import SharedBase

    shared = SharedBase(far_student_from_wan(_wan().to(torch.bfloat16), chunk_partition=PARTITION), rank=4,
                        roles=("student",))
    embed = shared.base.far_patch_embedding
    assert embed.weight.dtype == torch.float32 and embed.weight.requires_grad
    assert shared.base.patch_embedding.weight.dtype == torch.bfloat16   # the frozen rest stays bf16
    student = shared.role("student")
    before = embed.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-6, betas=(0.9, 0.95))
    clean, text = _video(sum(PARTITION)), _text()
    cond = TeacherForcing(text, clean[:, 3:], clean[:, :3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = student(_video(6, seed=3), T, R, cond)
    u.float().square().mean().backward()
    opt.step()
    changed = (embed.weight.detach() != before).float().mean().item()
    assert changed > 0.99, f"only {changed:.1%} of the compressed patch kernel moved"
