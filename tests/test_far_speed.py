"""The causal (FAR) path's speed levers on CPU: compiled flex attention (``model.causal.flex_compile``) against
SDPA with the mask made dense and diffusers' eager flex, and the block masks built once per layout.

References: ``F.scaled_dot_product_attention`` with a boolean mask (a different kernel from flex), diffusers'
own processor (eager flex_attention) and diffusers' forward building its own mask (the path before the cache).
Flex attention has no backward on CPU in torch 2.13 (compiled or eager: "FlexAttention does not support
backward on CPU"), so the compiled kernel is checked on forwards; training on CPU runs the dense path.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.transformers import transformer_anyflow_far
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from anystep.models import far_attention, far_masks
from anystep.models.architectures import CausalModelConfig
from anystep.models.far import (
    bidirectional,
    far_student_from_wan,
    set_causal_attention,
    split_chunks,
    teacher_forced,
)
from anystep.models.far_cache import ChunkCache

C, TEXT_DIM, H, W = 4, 32, 8, 8
PARTITION = [1, 2, 2, 2, 2]     # full_chunk_limit 3: chunks 0, 1 (3 frames) compressed context, 3 chunks noisy
T, R = torch.tensor([937.5, 312.5]), torch.tensor([833.3, 0.0])
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _far(partition=PARTITION):
    torch.manual_seed(0)
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=C,
                                out_channels=C, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=64, num_layers=2,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    with torch.no_grad():   # Wan zero-inits some layers; make every weight matter
        for p in wan.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return far_student_from_wan(wan, chunk_partition=partition)


def _video(frames: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, C, H, W, generator=torch.Generator().manual_seed(seed))


def _text(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 5, TEXT_DIM, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def compiled_calls(monkeypatch):
    """The query shapes of every call of the compiled flex kernel."""
    calls, real = [], far_attention.compiled_flex_attention

    def spy():
        kernel = real()

        def counted(query, *args, **kwargs):
            calls.append(tuple(query.shape))
            return kernel(query, *args, **kwargs)
        return counted
    monkeypatch.setattr(far_attention, "compiled_flex_attention", spy)
    return calls


def test_compiled_flex_is_masked_sdpa_at_every_length(compiled_calls):
    """Two sequence lengths (two specialisations of the compiled kernel, with dynamo's global recompile limit
    at 1), head dim 8 (padded to flex's minimum 16 with the scale of 8), a chunk-causal mask with padding."""
    kernels = len(_debug_get_cache_entry_list(flex_attention))
    g = torch.Generator().manual_seed(0)
    for length in (100, 200):
        padded = 128 * -(-length // 128)
        chunk = torch.arange(padded) * 3 // length            # 3 chunks, the padding after the last

        def mask_mod(b, h, q, kv, chunk=chunk, length=length):
            return (chunk[q] >= chunk[kv]) & (q < length) & (kv < length)
        block = create_block_mask(mask_mod, None, None, padded, padded, device="cpu")
        q, k, v = (torch.randn(2, 3, length, 8, generator=g) for _ in range(3))
        dense = far_masks.dense_mask(block, length)
        assert dense.sum() < length * length                  # the mask masks
        with torch._dynamo.config.patch(recompile_limit=1):
            out = far_attention.padded_flex_attention(q, k, v, block)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
                                   rtol=1e-5, atol=1e-5)
    assert compiled_calls == [(2, 3, 128, 16), (2, 3, 256, 16)]
    # one compiled kernel per length (past the limit dynamo would run flex_attention eagerly, adding none)
    assert len(_debug_get_cache_entry_list(flex_attention)) - kernels == 2


def _train_and_prefill(far):
    """u of the teacher-forced forward and the KV cache of a prefill of all frames, no grad."""
    n_comp, _ = split_chunks(far, PARTITION)
    fc = sum(PARTITION[:n_comp])
    clean, noisy, text = _video(sum(PARTITION)), _video(sum(PARTITION) - fc, seed=2), _text()
    with torch.no_grad():
        u = teacher_forced(far, noisy, T, R, text, clean=clean[:, fc:], context=clean[:, :fc],
                           chunk_partition=PARTITION)
        cache = ChunkCache(far)
        cache.prefill(clean[:, :7], text, PARTITION[:4])
        return [u, *(kv for layer in cache._cache for kv in layer.values())]


@pytest.mark.slow   # inductor compiles the flex kernel for two sequence lengths on the CPU: about 20-40 s
def test_compiled_flex_equals_dense_and_eager_flex_on_the_far_paths(compiled_calls):
    far = _far()
    results = {}
    for name, backend, compiled in (("dense", "dense", True), ("eager flex", "flex", False),
                                    ("diffusers", "diffusers", True), ("compiled flex", "flex", True)):
        set_causal_attention(far, backend, flex_compile=compiled)
        compiled_calls.clear()
        results[name] = _train_and_prefill(far)
        assert len(compiled_calls) == (2 * 2 if name == "compiled flex" else 0), name   # 2 layers x 2 calls
    for name in ("dense", "eager flex", "diffusers"):
        for got, want in zip(results["compiled flex"], results[name], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)   # measured <= 1e-6


def test_block_masks_are_built_once_per_layout(monkeypatch):
    far = _far()
    set_causal_attention(far, "dense")
    builds, dense = [], []
    build, make_dense = transformer_anyflow_far._build_far_block_mask_from_far_cfg, far_masks.dense_mask
    monkeypatch.setattr(transformer_anyflow_far, "_build_far_block_mask_from_far_cfg",
                        lambda *a, **k: builds.append(1) or build(*a, **k))
    monkeypatch.setattr(far_masks, "dense_mask", lambda *a: dense.append(1) or make_dense(*a))
    far_masks.clear()
    first = _train_and_prefill(far)
    assert (len(builds), len(dense)) == (2, 2)            # train (with clean copies) and prefill
    again = [_train_and_prefill(far) for _ in range(2)]
    assert (len(builds), len(dense)) == (2, 2)            # the same layouts: nothing built again
    for out in again:
        assert all(torch.equal(a, b) for a, b in zip(out, first, strict=True))
    # before the cache: diffusers' forward builds its own mask every call; the same numbers
    monkeypatch.setattr(far_masks, "block_mask", lambda *a, **k: None)
    builds.clear()
    uncached = _train_and_prefill(far)
    assert len(builds) == 2 and all(torch.equal(a, b) for a, b in zip(uncached, first, strict=True))


def test_a_layout_is_everything_the_mask_depends_on():
    far, other = _far(), _far([1, 2, 2])
    base = {"mode": "train", "chunk_partition": [1, 2, 2], "height": H, "width": W, "has_clean": True,
            "device": torch.device("cpu")}
    far_masks.clear()
    mask = far_masks.block_mask(far, **base)
    assert far_masks.block_mask(far, **base) is mask and far_masks.block_mask(other, **base) is mask
    for change in ({"mode": "cache"}, {"chunk_partition": [1, 2, 1, 1]}, {"height": 16}, {"has_clean": False}):
        assert far_masks.block_mask(far, **{**base, **change}) is not mask, change
    other.register_to_config(full_chunk_limit=2)
    assert far_masks.block_mask(other, **base) is not mask


def test_flex_compile_switch():
    assert CausalModelConfig().compiled_flex and not CausalModelConfig(flex_compile=False).compiled_flex
    with pytest.raises(ValueError, match="flex_compile"):
        CausalModelConfig(attention="dense", flex_compile=True)
    far = _far([1, 2])
    assert far.blocks[0].attn1.processor.flex_compile
    processor = set_causal_attention(far, "flex", flex_compile=False)
    assert all(b.attn1.processor is processor for b in far.blocks) and not processor.flex_compile


def test_the_bidirectional_mode_runs_without_a_mask(compiled_calls, monkeypatch):
    """A one-chunk call without clean copies (critic, teacher, the bidirectional loss) masks nothing: SDPA
    without a mask (the official code's bidirectional attention), not flex or a dense all-true mask."""
    far, x, text = _far(), _video(5), _text()
    with torch.no_grad():
        set_causal_attention(far, "diffusers")
        want = bidirectional(far, x, T, R, text)      # diffusers' eager flex under the all-allowing mask
        processor = set_causal_attention(far, "flex")
        monkeypatch.setattr(far_masks, "dense_mask", None)
        got = bidirectional(far, x, T, R, text)
    assert compiled_calls == [] and processor.mask is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flex_compile_reaches_the_run_s_student():
    from anystep.build import build_trainer
    from anystep.config import resolve

    for value, compiled in (("false", False), ("true", True)):
        cfg = resolve("shapes_far_stage1", [f"model.causal.flex_compile={value}", "train.steps=1"])
        student = build_trainer(cfg, progress=False).method.roles["student"].transformer
        assert student.blocks[0].attn1.processor.flex_compile is compiled
