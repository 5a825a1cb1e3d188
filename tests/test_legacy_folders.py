"""Released AnyFlow folders in both metadata layouts (anystep.models.folder, anystep.export.import_anyflow).

The first ``nvidia/AnyFlow-*-Diffusers`` uploads carry the official code's metadata: transformer
``FAR_Wan_Transformer3DModel`` (one class for both variants, ``init_far_model`` telling them apart), pipeline
``WanAnyFlowPipeline`` / ``FARWanAnyFlowPipeline``, scheduler ``far.schedulers...FlowMapDiscreteScheduler``.
The old-layout folders here are diffusers-layout exports of tiny random models whose metadata is rewritten the
way NVlabs/AnyFlow's ``scripts/convert_model/convert_anyflow_to_diffusers.py`` writes it. The reference is the
source model itself: a loaded transformer must give its outputs on the same input.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from anystep.export import export_pipeline, import_anyflow
from anystep.models.far import bidirectional, far_student_from_wan, set_causal_attention, teacher_forced
from anystep.models.folder import ModelFolderError, load_transformer, transformer_class_name, transformer_kind
from anystep.models.tiny_folder import build_tiny_wan_folder
from anystep.models.wan import student_from_wan

PARTITION = [1, 1, 1, 2]            # full_chunk_limit 3: chunk 0 is compressed context in teacher forcing
DIFFUSERS_CLASS = {"bi": "AnyFlowTransformer3DModel", "far": "AnyFlowFARTransformer3DModel"}
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def official_transformer_config(config: dict, far: bool) -> dict:
    """The transformer ``config.json`` the official converter saves: ``FAR_Wan_Transformer3DModel`` built by
    ``from_pretrained`` of the Wan2.1 base (``_name_or_path``; the base's ``pos_embed_seq_len`` rides along as
    a hidden key), every constructor argument of the official class (its ``qk_norm``, ``added_kv_proj_dim``,
    and the FAR arguments, at their defaults for the bidirectional model), then the flags it registers."""
    sizes = {k: v for k, v in config.items() if not k.startswith("_")}
    return {"_class_name": "FAR_Wan_Transformer3DModel", "_diffusers_version": "0.38.0",
            "_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", **sizes,
            "compressed_patch_size": sizes.get("compressed_patch_size", [1, 4, 4]),
            "full_chunk_limit": sizes.get("full_chunk_limit", 3),
            "chunk_partition": sizes.get("chunk_partition"), "qk_norm": "rms_norm_across_heads",
            "added_kv_proj_dim": None, "pos_embed_seq_len": None,
            "init_far_model": far, "init_flowmap_model": True, "gate_value": 0.25, "deltatime_type": "r"}


def official_model_index(index: dict, far: bool) -> dict:
    """``model_index.json`` of a pipeline saved from the official code: its pipeline and the ``far.*``
    modules of its transformer and scheduler (diffusers records the defining module of a foreign class)."""
    return {"_class_name": "FARWanAnyFlowPipeline" if far else "WanAnyFlowPipeline",
            "_diffusers_version": "0.38.0", "_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            **{part: index[part] for part in ("text_encoder", "tokenizer", "vae")},
            "scheduler": ["far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapDiscreteScheduler"],
            "transformer": ["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"]}


def to_official_layout(folder, out, far: bool):
    """A copy of a diffusers-layout AnyFlow folder with the official code's metadata (same weight files)."""
    shutil.copytree(folder, out)
    cfg = out / "transformer" / "config.json"
    cfg.write_text(json.dumps(official_transformer_config(json.loads(cfg.read_text()), far), indent=2))
    index = out / "model_index.json"
    index.write_text(json.dumps(official_model_index(json.loads(index.read_text()), far), indent=2))
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMapDiscreteScheduler", "_diffusers_version": "0.38.0", "num_train_timesteps": 1000,
         "shift": 5.0, "weight_type": "gaussian"}))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tiny_wan_folder(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def models(source):
    """The two source models, every weight perturbed (Wan zero-inits some layers) so that all of them count."""
    wan = load_transformer(source)
    out = {"bi": student_from_wan(wan), "far": far_student_from_wan(wan, chunk_partition=PARTITION,
                                                                      attention="dense")}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in out.values():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return {k: m.eval() for k, m in out.items()}


@pytest.fixture(scope="module")
def folders(source, models, tmp_path_factory):
    """{(variant, layout): folder} for variant bi / far and layout new (diffusers) / old (official)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for variant, model in models.items():
        out[variant, "new"] = export_pipeline(model, source, root / f"{variant}-new")
        out[variant, "old"] = to_official_layout(out[variant, "new"], root / f"{variant}-old", variant == "far")
    return out


def _inputs(frames: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, frames, 16, 8, 8, generator=g), torch.tensor([937.5, 400.0]),
            torch.tensor([625.0, 0.0]), torch.randn(2, 6, 32, generator=g))


@torch.no_grad()
def outputs(model, variant: str) -> list[torch.Tensor]:
    """The model's outputs on fixed inputs: the bidirectional forward, and for the FAR model also the
    teacher-forced causal forward (dense attention on CPU)."""
    x, t, r, text = _inputs(sum(PARTITION))
    if variant == "bi":
        return [anyflow_forward(model, x, t, r, text)]
    set_causal_attention(model, "dense")
    return [bidirectional(model, x, t, r, text),
            teacher_forced(model, x[:, 1:], t, r, text, clean=x[:, 1:].flip(0), context=x[:, :1],
                           chunk_partition=PARTITION)]


@torch.no_grad()
def anyflow_forward(model, x, t, r, text):
    """A diffusers AnyFlow transformer on (B, F, C, H, W) latents with per-sample times."""
    frames = x.shape[1]
    return model(hidden_states=x, timestep=t[:, None].expand(-1, frames), r_timestep=r[:, None].expand(-1, frames),
                 encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("variant", ["bi", "far"])
@pytest.mark.parametrize("layout", ["new", "old"])
def test_both_layouts_load_as_the_source_model(models, folders, variant, layout):
    folder = folders[variant, layout]
    assert transformer_class_name(folder) == DIFFUSERS_CLASS[variant]
    assert transformer_kind(folder) == {"bi": "anyflow", "far": "anyflow_far"}[variant]
    reference = outputs(models[variant], variant)
    for loaded in (load_transformer(folder), import_anyflow(folder), load_transformer(folder / "transformer")):
        assert type(loaded).__name__ == DIFFUSERS_CLASS[variant]
        assert loaded.config.gate_value == 0.25 and "init_far_model" not in loaded.config
        for got, want in zip(outputs(loaded.eval(), variant), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if variant == "far":
        assert list(load_transformer(folder).config.chunk_partition) == PARTITION


def test_old_layout_reexports_in_the_diffusers_layout(folders, models, tmp_path):
    """import + export converts an old-layout folder: diffusers' own pipeline class then loads it."""
    from diffusers import AnyFlowFARPipeline

    out = export_pipeline(import_anyflow(folders["far", "old"]), folders["far", "old"], tmp_path / "converted")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "AnyFlowFARPipeline"
    pipe = AnyFlowFARPipeline.from_pretrained(out)
    for got, want in zip(outputs(pipe.transformer, "far"), outputs(models["far"], "far"), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bf16_load_keeps_the_same_dtypes_in_both_layouts(folders):
    new, old = (load_transformer(folders["bi", k], dtype=torch.bfloat16) for k in ("new", "old"))
    assert {k: v.dtype for k, v in new.state_dict().items()} == {k: v.dtype for k, v in old.state_dict().items()}
    assert new.state_dict()["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16


def _edit_config(folder, tmp_path, **changes):
    out = shutil.copytree(folder, tmp_path / "edited")
    cfg = out / "transformer" / "config.json"
    config = {**json.loads(cfg.read_text()), **changes}
    cfg.write_text(json.dumps({k: v for k, v in config.items() if v != "<drop>"}))
    return out


@pytest.mark.parametrize("changes, message", [
    ({"init_flowmap_model": False}, "without init_flowmap_model"),
    ({"qk_norm": "rms_norm"}, "qk_norm='rms_norm' is not supported"),
    ({"window_size": [-1, -1]}, "config keys \\['window_size'\\] .* no counterpart"),
    ({"_class_name": "MyTransformer"}, "'MyTransformer' is not supported"),
])
def test_old_layout_errors_name_the_problem(folders, tmp_path, changes, message):
    folder = _edit_config(folders["bi", "old"], tmp_path, **changes)
    with pytest.raises(ModelFolderError, match=message):
        load_transformer(folder)


def test_old_layout_weights_load_strictly(folders, tmp_path):
    """A FAR flag on bidirectional weights (no far_patch_embedding), or a stray tensor, is refused."""
    with pytest.raises(ModelFolderError, match="missing \\['far_patch_embedding.bias'"):
        load_transformer(_edit_config(folders["bi", "old"], tmp_path, init_far_model=True))
    out = shutil.copytree(folders["far", "old"], tmp_path / "stray")
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ModelFolderError, match="unexpected \\['extra.weight'\\]"):
        import_anyflow(out)


def test_old_layout_folder_is_a_released_model_to_continue_training(folders, models, source, tmp_path):
    """world.wan.model=<old-layout folder>: a Stage-2 run needs no model.init, as with a diffusers-layout
    folder, and its student starts as the released model."""
    import imageio
    import numpy as np

    from anystep.config import resolve
    from anystep.data.encode import cache_videos
    from anystep.recipes import build_trainer

    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(2):
        imageio.mimwrite(clips / f"c{i}.mp4", [np.full((32, 32, 3), 40 * i + 20 * f, np.uint8) for f in range(5)],
                         fps=8)
        (clips / f"c{i}.txt").write_text(f"clip {i}")
    cache = cache_videos(source, clips, tmp_path / "cache", frames=5, height=32, width=32, dtype="float32",
                         progress=False)
    cfg = resolve("wan1.3b_stage2", [f"world.wan.model={folders['bi', 'old']}", f"world.wan.data={cache}",
                                     "model.lora_rank=4", "model.lora_alpha=8", "model.init=null",
                                     "stage2.teacher=null", "model.base_dtype=float32", "train.batch_size=2",
                                     f"train.out_dir={tmp_path / 'run'}"])
    student = build_trainer(cfg, progress=False).method.roles["student"]
    x, t, r, text = _inputs(2)
    with torch.no_grad():
        start = student(x, t, r, text)
    torch.testing.assert_close(start, anyflow_forward(models["bi"], x, t, r, text), rtol=0, atol=1e-6)
