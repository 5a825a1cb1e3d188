"""Exported causal models in stock diffusers: ``anystep.patch_far_pipeline`` and what the export tells users.

diffusers 0.42.1's ``AnyFlowFARPipeline`` pads queries and keys to a multiple of 128 tokens without a mask in
the KV-cache denoising step. The reference is anystep's own causal sampler (``causal.sample_causal``, the
official chunk-by-chunk semantics, checked elsewhere against the official rules) on the same weights, noise
and text; the stock pipeline is built from diffusers' classes alone (its own attention processors).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AnyFlowFARPipeline,
    AnyFlowFARTransformer3DModel,
    AnyFlowPipeline,
    FlowMapEulerDiscreteScheduler,
)

import anystep
from anystep.causal import sample_causal
from anystep.cli import _load_hint
from anystep.export import export_pipeline
from anystep.models.far import CausalStudent, far_student_from_wan
from anystep.models.far_attention import FARAttnProcessor
from anystep.models.tiny_folder import build_tiny_wan_folder, tiny_wan_components
from anystep.models.wan import student_from_wan

PARTITION = [1, 1, 1, 2]        # 5 latent frames of 4 x 4 = 4 tokens: no chunk is a multiple of 128 tokens
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(scope="module")
def setup():
    parts = tiny_wan_components(seed=1)
    far = far_student_from_wan(parts["transformer"], chunk_partition=PARTITION, attention="dense").eval()
    stock = AnyFlowFARTransformer3DModel.from_config(far.config).eval()   # diffusers' own processors
    stock.load_state_dict(far.state_dict())
    pipe = AnyFlowFARPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                              transformer=stock, scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    text, _ = pipe.encode_prompt("a red block moving right", do_classifier_free_guidance=False)
    noise = torch.randn(1, 5, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = sample_causal(CausalStudent(far), noise.clone(), text, steps=2)
    return pipe, parts, text, noise, ours


def _pipeline_latents(pipe, text, noise) -> torch.Tensor:
    out = pipe(prompt_embeds=text, height=32, width=32, num_frames=17, num_inference_steps=2,
               latents=noise.permute(0, 2, 1, 3, 4).clone(), output_type="latent", chunk_partition=PARTITION).frames
    return out if out.shape == noise.shape else out.permute(0, 2, 1, 3, 4)


def test_patched_pipeline_equals_our_sampler_and_the_stock_one_does_not(setup):
    pipe, _, text, noise, ours = setup
    stock = _pipeline_latents(pipe, text, noise)
    assert (stock - ours).abs().max() > 1e-2          # measured 0.14 on latents of magnitude ~4
    assert anystep.patch_far_pipeline(pipe) is pipe
    torch.testing.assert_close(_pipeline_latents(pipe, text, noise), ours, rtol=0, atol=1e-5)
    processor = pipe.transformer.blocks[0].attn1.processor
    assert isinstance(processor, FARAttnProcessor) and processor.backend == "auto"
    anystep.patch_far_pipeline(pipe)                   # idempotent: the installed processor stays
    assert all(block.attn1.processor is processor for block in pipe.transformer.blocks)


def test_patch_refuses_other_pipelines(setup):
    _, parts, *_ = setup
    bidirectional = AnyFlowPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                                    vae=parts["vae"], transformer=student_from_wan(parts["transformer"]),
                                    scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    with pytest.raises(TypeError, match="expects a diffusers AnyFlowFARPipeline, got AnyFlowPipeline"):
        anystep.patch_far_pipeline(bidirectional)
    with pytest.raises(TypeError, match="got str"):
        anystep.patch_far_pipeline("pipe")
    with pytest.raises(ValueError, match="backend"):
        anystep.patch_far_pipeline(setup[0], backend="diffusers")


def test_causal_export_says_how_to_load_it(setup, tmp_path):
    """The exported causal folder's README and the export command's hint name AnyFlowFARPipeline and the
    patch; the bidirectional ones do not."""
    _, parts, *_ = setup
    source = build_tiny_wan_folder(tmp_path / "wan")
    far = far_student_from_wan(parts["transformer"], chunk_partition=PARTITION)
    causal = export_pipeline(far, source, tmp_path / "far")
    readme = (causal / "README.md").read_text()
    assert "from diffusers import AnyFlowFARPipeline" in readme and "AnyFlowFARTransformer3DModel" in readme
    assert "anystep.patch_far_pipeline(pipe)" in readme and "AnyFlowPipeline" not in readme
    assert str(PARTITION) in readme and "causal" in readme
    hint = _load_hint(causal, adapters=False)
    assert "from diffusers import AnyFlowFARPipeline" in hint and "anystep.patch_far_pipeline(pipe)" in hint
    bi = export_pipeline(student_from_wan(parts["transformer"]), source, tmp_path / "bi")
    assert "patch_far_pipeline" not in (bi / "README.md").read_text() + _load_hint(bi, adapters=True)
    assert "from diffusers import AnyFlowPipeline" in _load_hint(bi, adapters=True)
