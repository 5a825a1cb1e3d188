"""Release export (anystep.export): diffusers AnyFlowPipeline folders, merged and LoRA-adapter variants.

References are independent of the export code: the student is the SharedBase "student" view (peft LoRA on
the live base), the adapter variant is loaded by diffusers' own ``load_lora_weights``, and the scheduler's
N = 4 schedule is the official one (shift 5: 1000, 937.5, 833.33, 625).
"""

import filecmp
import json

import pytest
import torch
from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from anystep.export import LORA_WEIGHT_NAME, LoraExport, export_pipeline, export_student, import_anyflow
from anystep.models.folder import ModelFolderError, load_transformer
from anystep.models.roles import SharedBase
from anystep.models.tiny_folder import build_tiny_wan_folder

RANK, ALPHA = 4, 8.0   # scaling 2: a dropped alpha shows
PARTS = ("vae", "text_encoder", "tokenizer")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tiny_wan_folder(tmp_path_factory.mktemp("src") / "wan")


@pytest.fixture(scope="module")
def shared(source):
    shared = SharedBase.from_wan(load_transformer(source), rank=RANK, alpha=ALPHA).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in shared.role("student").named_parameters():
            if ".lora_B." in key:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return shared


@pytest.fixture(scope="module")
def merged_dir(source, shared, tmp_path_factory):
    return export_student(shared, source, tmp_path_factory.mktemp("merged") / "anyflow")


@pytest.fixture(scope="module")
def adapter_dir(source, shared, tmp_path_factory):
    return export_student(shared, source, tmp_path_factory.mktemp("adapter") / "anyflow", as_adapter=True)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 16, 4, 4, generator=g)   # (B, F, C, H, W) latents
    return x, torch.tensor([937.5]), torch.tensor([625.0]), torch.randn(1, 8, 32, generator=g)


@torch.no_grad()
def _run(transformer, x, t, r, text):
    """A diffusers AnyFlow transformer on (B, F, C, H, W) with per-frame (B, F) times."""
    frames = x.shape[1]
    return transformer(hidden_states=x, timestep=t[:, None].expand(-1, frames),
                       r_timestep=r[:, None].expand(-1, frames), encoder_hidden_states=text,
                       return_dict=False)[0]


@torch.no_grad()
def _student(shared):
    return shared.role("student")(*_inputs())


@torch.no_grad()
def _bare(shared):
    with shared.using(None):
        return _run(shared.base, *_inputs())


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- merged
@pytest.mark.parametrize("steps", [1, 4])
def test_merged_export_samples_at_any_step_count(merged_dir, steps):
    pipe = AnyFlowPipeline.from_pretrained(merged_dir)
    video = pipe("a red ball rolls", height=32, width=32, num_frames=5, num_inference_steps=steps,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 3, 32, 32)
    assert torch.isfinite(video).all()


def test_merged_transformer_is_the_student(merged_dir, shared):
    loaded = AnyFlowPipeline.from_pretrained(merged_dir).transformer
    out, student, bare = _run(loaded, *_inputs()), _student(shared), _bare(shared)
    torch.testing.assert_close(out, student, rtol=1e-5, atol=1e-5)
    assert (student - bare).abs().max() > 1e-2   # the adapter matters


def test_scheduler_is_the_official_flow_map_euler(merged_dir):
    pipe = AnyFlowPipeline.from_pretrained(merged_dir)
    assert isinstance(pipe.scheduler, FlowMapEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 5.0 and pipe.scheduler.config.num_train_timesteps == 1000
    pipe.scheduler.set_timesteps(4)
    expected = torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0], dtype=torch.float64)
    torch.testing.assert_close(pipe.scheduler.timesteps.double(), expected, rtol=0, atol=1e-6)


def test_copied_parts_are_byte_identical(merged_dir, source):
    for part in PARTS:
        files = sorted(p.relative_to(source / part) for p in (source / part).rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(merged_dir / part)
                                         for p in (merged_dir / part).rglob("*") if p.is_file())
        for f in files:
            assert filecmp.cmp(source / part / f, merged_dir / part / f, shallow=False), f"{part}/{f}"
    index = json.loads((merged_dir / "model_index.json").read_text())
    assert index["_class_name"] == "AnyFlowPipeline"
    assert index["transformer"] == ["diffusers", "AnyFlowTransformer3DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMapEulerDiscreteScheduler"]
    readme = (merged_dir / "README.md").read_text()
    assert "AnyFlowPipeline.from_pretrained" in readme and "load_lora_weights" not in readme


# ------------------------------------------------------------------------------------------ adapter
def test_adapter_export_loads_into_the_student(adapter_dir, merged_dir, shared):
    pipe = AnyFlowPipeline.from_pretrained(adapter_dir)
    torch.testing.assert_close(_run(pipe.transformer, *_inputs()), _bare(shared), rtol=0, atol=0)
    pipe.load_lora_weights(adapter_dir)
    lora_paths = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    targets = shared.adapters["student"].targets
    assert lora_paths == set(targets)    # every target, the time and delta embedders' linears included
    assert any("delta_embedder" in t for t in targets) and any("time_embedder" in t for t in targets)
    merged = AnyFlowPipeline.from_pretrained(merged_dir).transformer
    out = _run(pipe.transformer, *_inputs())
    torch.testing.assert_close(out, _run(merged, *_inputs()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _student(shared), rtol=1e-5, atol=1e-5)
    assert (out - _bare(shared)).abs().max() > 1e-2
    assert "load_lora_weights" in (adapter_dir / "README.md").read_text()


def test_adapter_file_is_right_without_its_metadata(adapter_dir, shared):
    """The scaling alpha / rank is in the tensors: a loader that ignores the metadata (alpha := rank)
    still gets the student."""
    state = load_file(adapter_dir / LORA_WEIGHT_NAME)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in state)
    pipe = AnyFlowPipeline.from_pretrained(adapter_dir)
    pipe.load_lora_weights(state)
    torch.testing.assert_close(_run(pipe.transformer, *_inputs()), _student(shared), rtol=1e-5, atol=1e-5)


def test_lora_export_is_validated(source, shared, tmp_path):
    lora = LoraExport.from_shared(shared)
    state = dict(lora.state)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        export_pipeline(shared.merged("teacher"), source, tmp_path / "x",
                        lora=LoraExport(state, lora.targets, RANK, ALPHA))
    with pytest.raises(ValueError, match="peft"):
        export_pipeline(shared.base, source, tmp_path / "y")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- atomicity
def test_existing_folder_is_left_untouched(source, shared, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_student(shared, source, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_only_a_complete_folder(source, shared, tmp_path, monkeypatch):
    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(FlowMapEulerDiscreteScheduler, "save_pretrained", fail)
        with pytest.raises(RuntimeError, match="disk full"):
            export_student(shared, source, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []
    export_student(shared, source, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model_index.json").is_file()
    assert _leftovers(tmp_path) == []


def test_failure_mid_export_leaves_nothing(source, shared, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(FlowMapEulerDiscreteScheduler, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_student(shared, source, tmp_path / "release")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- dtype
def test_bf16_release_keeps_fp32_modules_and_samples(source, shared, tmp_path):
    out = export_student(shared, source, tmp_path / "bf16", dtype=torch.bfloat16)
    state = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert state["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert state["condition_embedder.delta_embedder.linear_1.weight"].dtype == torch.bfloat16
    assert state["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32
    assert state["scale_shift_table"].dtype == torch.float32
    pipe = AnyFlowPipeline.from_pretrained(out, dtype=torch.bfloat16)
    video = pipe("a red ball", height=32, width=32, num_frames=5, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(video.float()).all()


# ------------------------------------------------------------------------------------------- import
def test_import_roundtrip(merged_dir, shared):
    loaded = import_anyflow(merged_dir)
    expected = shared.merged("student").state_dict()
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_import_rejects_a_wan_folder(source):
    with pytest.raises(ModelFolderError, match="WanTransformer3DModel.*student_from_wan"):
        import_anyflow(source)


def test_import_of_a_hub_id_asks_for_a_local_path():
    with pytest.raises(ModelFolderError, match="local path"):
        import_anyflow("nvidia/AnyFlow-Wan2.1-T2V-1.3B-Diffusers")



def test_reexport_from_an_anyflow_folder(merged_dir, tmp_path):
    """A released AnyFlow folder is a valid source too; import + export reproduces its transformer."""
    out = export_pipeline(import_anyflow(merged_dir), merged_dir, tmp_path / "again")
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        again, first = load_file(out / part), load_file(merged_dir / part)
        assert again.keys() == first.keys()
        assert all(torch.equal(again[k], first[k]) for k in first)
    assert json.loads((out / "model_index.json").read_text()) == json.loads(
        (merged_dir / "model_index.json").read_text())
