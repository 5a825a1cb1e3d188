"""Release a trained student as a diffusers ``AnyFlowPipeline`` folder, and load released folders back.

The folder has the layout of NVIDIA's released ``AnyFlow-Wan2.1-T2V-*-Diffusers`` models (official
``convert_anyflow_to_diffusers``): ``transformer/`` (an ``AnyFlowTransformer3DModel``), ``scheduler/`` (a
``FlowMapEulerDiscreteScheduler``, shift 5, 1000 train steps), and ``vae/``, ``text_encoder/``,
``tokenizer/`` copied byte for byte from the source Wan2.1 (or AnyFlow) folder, plus ``model_index.json``
and a ``README.md``::

    pipe = AnyFlowPipeline.from_pretrained(out_dir)
    video = pipe("a prompt", num_inference_steps=4).frames

Two variants:

* merged (default): the student's LoRA merged into the base, ``W + (alpha / rank) B A`` (the official
  ``convert_lora_into_base``);
* adapter (``lora=LoraExport(...)``): the *base* transformer plus ``pytorch_lora_weights.safetensors`` in
  diffusers' format (``transformer.<module>.lora_A.weight`` / ``lora_B.weight``), loaded with
  ``pipe.load_lora_weights(out_dir)`` (``AnyFlowPipeline`` inherits ``WanLoraLoaderMixin``). The scaling
  alpha / rank is folded into ``lora_B`` and the file's adapter metadata says ``lora_alpha = r``, so every
  loader gives the trained model, whether or not it reads the metadata (without metadata diffusers assumes
  alpha = rank). LoRA on the embedders' linears (``condition_embedder.{time,delta}_embedder.linear_{1,2}``,
  in the student's official targets) loads through this path like the block linears: diffusers 0.42.1 /
  peft inject a LoRA layer into any ``nn.Linear`` named in ``target_modules``, which the metadata lists.

Exports are atomic: the folder is written under a temporary sibling name and renamed into place at the end,
so an interrupted export never leaves a half-written ``out_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .models.folder import ModelFolderError, load_transformer, require_local_folder, transformer_kind

COPIED_PARTS = ("vae", "text_encoder", "tokenizer")
OFFICIAL_SHIFT = 5.0
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default, found by load_lora_weights(dir)
_DEFAULT_ENTRIES = {"vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
                    "tokenizer": ["transformers", "AutoTokenizer"]}


@dataclass(frozen=True)
class LoraExport:
    """A LoRA adapter to save beside an unmerged base transformer.

    Args:
        state: the adapter tensors under peft's adapter-free names, ``<module>.lora_A.weight`` (rank x in)
            and ``<module>.lora_B.weight`` (out x rank), e.g. a student ``RoleView.state_dict()`` or its EMA.
        targets: the module paths that carry the adapter (``nn.Linear`` layers of the base).
        rank, alpha: LoRA rank and alpha; the adapter adds ``(alpha / rank) B A`` to each target's weight.
    """

    state: Mapping[str, torch.Tensor]
    targets: Sequence[str]
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_shared(cls, shared, role: str = "student",
                    lora_state: Mapping[str, torch.Tensor] | None = None) -> LoraExport:
        """The adapter of ``role`` on a :class:`~anystep.models.roles.SharedBase` (``lora_state``, e.g. an
        EMA of the view's state dict, replaces the live weights)."""
        name = shared.roles[role].adapter
        if name is None:
            raise ValueError(f"role {role!r} has no adapter (it is the bare base)")
        adapter = shared.adapters[name]
        state = lora_state if lora_state is not None else adapter.params
        return cls({k: v.detach() for k, v in state.items()}, list(adapter.targets), adapter.rank, adapter.alpha)

    def validate(self, transformer: nn.Module) -> None:
        """Raise unless the keys are exactly the targets' A/B weights, every target is an ``nn.Linear`` of
        ``transformer`` (``TypeError``) and the shapes fit it (``ValueError``)."""
        expected = {f"{t}.lora_{ab}.weight" for t in self.targets for ab in "AB"}
        if set(self.state) != expected:
            extra, missing = sorted(set(self.state) - expected), sorted(expected - set(self.state))
            raise ValueError(f"LoRA state does not match its targets: unexpected {extra[:4]}, missing {missing[:4]}")
        modules = dict(transformer.named_modules())
        for t in self.targets:
            linear = modules.get(t)
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"LoRA target {t!r} is not an nn.Linear of the transformer ({type(linear).__name__})")
            a, b = self.state[f"{t}.lora_A.weight"], self.state[f"{t}.lora_B.weight"]
            if a.shape != (self.rank, linear.in_features) or b.shape != (linear.out_features, self.rank):
                raise ValueError(f"LoRA {t}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit rank {self.rank} "
                                 f"and the layer ({linear.out_features} x {linear.in_features})")

    def diffusers_layers(self, dtype: torch.dtype | None = None,
                         keep_fp32: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """The tensors to save, scaling folded into ``lora_B`` (so the file's alpha is its rank)."""
        out = {}
        for key, value in self.state.items():
            value = value.detach().float().cpu()
            if ".lora_B." in key:
                value = value * self.scaling
            out[key] = value.to(_param_dtype(key, dtype, keep_fp32) or value.dtype).contiguous()
        return out

    def metadata(self) -> dict:
        """The ``LoraConfig`` fields diffusers builds the adapter from (``lora_alpha = r``: scaling folded)."""
        return {"r": self.rank, "lora_alpha": self.rank, "target_modules": sorted(self.targets),
                "lora_dropout": 0.0, "bias": "none"}


def export_pipeline(transformer, source: str | Path, out_dir: str | Path, *, shift: float = OFFICIAL_SHIFT,
                    lora: LoraExport | None = None, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write an ``AnyFlowPipeline`` folder at ``out_dir`` and return its path.

    Args:
        transformer: a plain ``AnyFlowTransformer3DModel`` (no peft layers): the merged student, or the base
            when ``lora`` is given.
        source: a local Wan2.1 or AnyFlow diffusers folder; its ``vae/``, ``text_encoder/`` and
            ``tokenizer/`` are copied unchanged.
        shift: the ``FlowMapEulerDiscreteScheduler`` shift (official: 5).
        lora: save ``transformer`` unmerged with this adapter beside it (``pipe.load_lora_weights(out_dir)``).
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete).
        dtype: cast the transformer (and adapter) for release, e.g. ``torch.bfloat16``; the model's
            ``_keep_in_fp32_modules`` (time embedder, norms, scale-shift tables) stay float32, as diffusers
            keeps them when loading with ``torch_dtype``. The copied parts are never cast.
    """
    src, out = _check_source(source), Path(out_dir).expanduser()
    _check_transformer(transformer)
    if lora is not None:
        lora.validate(transformer)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if out.resolve() == src.resolve():
        raise UsageError(f"out_dir {out} is the source folder; export to a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_folder(tmp, transformer, src, shift, lora, dtype)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_student(shared, source: str | Path, out_dir: str | Path, *, role: str = "student",
                   lora_state: Mapping[str, torch.Tensor] | None = None, as_adapter: bool = False,
                   **kwargs) -> Path:
    """:func:`export_pipeline` for a role of a :class:`~anystep.models.roles.SharedBase`: merged
    (``shared.merged``), or with ``as_adapter=True`` the bare base plus the role's adapter. ``lora_state``
    (e.g. the EMA of the view's state dict) replaces the live adapter weights."""
    if as_adapter:
        return export_pipeline(plain_base(shared.base), source, out_dir,
                               lora=LoraExport.from_shared(shared, role, lora_state), **kwargs)
    return export_pipeline(shared.merged(role, lora_state=lora_state), source, out_dir, **kwargs)


def import_anyflow(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The transformer of a released (or exported) AnyFlow diffusers folder (local path; ``folder`` may also be
    the ``transformer/`` folder itself): an ``AnyFlowTransformer3DModel``, or an
    ``AnyFlowFARTransformer3DModel`` for a causal folder. Both metadata layouts load: the diffusers classes',
    and the first uploads' official ``FAR_Wan_Transformer3DModel`` (see :mod:`anystep.models.folder`);
    re-exporting an imported old-layout folder writes it in the diffusers layout."""
    p = require_local_folder(folder)
    if transformer_kind(p) == "wan":
        raise ModelFolderError(f"{p}: the transformer is a WanTransformer3DModel, not an AnyFlow transformer. "
                               "This is a Wan2.1 folder: load it with anystep.models.folder.load_transformer and "
                               "build the student with anystep.models.wan.student_from_wan.")
    return load_transformer(p, dtype=dtype)


def plain_base(model: nn.Module):
    """A copy of a transformer carrying peft LoRA layers without them (the frozen base weights only)."""
    from accelerate import init_empty_weights

    state = {k.replace(".base_layer.", "."): v.detach().clone()
             for k, v in model.state_dict().items() if ".lora_" not in k}
    with init_empty_weights():   # no random float32 init of a model about to be overwritten
        clean = type(model).from_config(model.config)
    clean.load_state_dict(state, strict=True, assign=True)
    return clean.train(model.training)


# ---------------------------------------------------------------------------------------------- helpers
def _check_source(source: str | Path) -> Path:
    src = require_local_folder(source)
    for part in COPIED_PARTS:
        require_local_folder(src, part)
    if not (src / "model_index.json").is_file():
        raise ModelFolderError(f"{src} has no model_index.json (expected a Wan2.1 or AnyFlow diffusers folder)")
    return src


PIPELINES = {"AnyFlowTransformer3DModel": "AnyFlowPipeline",         # bidirectional student
             "AnyFlowFARTransformer3DModel": "AnyFlowFARPipeline"}   # causal (FAR) student


def _pipeline_name(transformer) -> str:
    return PIPELINES[type(transformer).__name__]


def _check_transformer(transformer) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if type(transformer).__name__ not in PIPELINES:
        raise TypeError(f"expected an AnyFlowTransformer3DModel or AnyFlowFARTransformer3DModel, got "
                        f"{type(transformer).__name__} (a Wan transformer becomes one with "
                        "anystep.models.wan.student_from_wan or anystep.models.far.far_student_from_wan)")
    if any(isinstance(m, BaseTunerLayer) for m in transformer.modules()):
        raise ValueError("the transformer carries peft adapter layers; export SharedBase.merged(...) or "
                         "plain_base(...) with lora=LoraExport(...) (or use export_student)")


def _write_folder(folder: Path, transformer, src: Path, shift: float, lora: LoraExport | None,
                  dtype: torch.dtype | None) -> None:
    """Everything of the pipeline folder, written into ``folder``."""
    from diffusers import FlowMapEulerDiscreteScheduler
    from diffusers.loaders import WanLoraLoaderMixin

    for part in COPIED_PARTS:
        shutil.copytree(src / part, folder / part)
    keep = tuple(type(transformer)._keep_in_fp32_modules or ())
    _cast_copy(transformer, dtype, keep).save_pretrained(folder / "transformer")
    FlowMapEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    if lora is not None:
        WanLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=lora.diffusers_layers(dtype, keep),
                                             weight_name=LORA_WEIGHT_NAME,
                                             transformer_lora_adapter_metadata=lora.metadata())
    (folder / "model_index.json").write_text(json.dumps(_model_index(src, transformer), indent=2) + "\n")
    (folder / "README.md").write_text(_readme(src, shift, lora, dtype, transformer))


def _param_dtype(name: str, dtype: torch.dtype | None, keep_fp32: Sequence[str]) -> torch.dtype | None:
    """diffusers' rule: a tensor whose dotted name has a ``_keep_in_fp32_modules`` part stays float32."""
    if dtype is None:
        return None
    return torch.float32 if any(m in name.split(".") for m in keep_fp32) else dtype


def _cast_copy(transformer, dtype: torch.dtype | None, keep_fp32: Sequence[str]):
    """``transformer`` itself (no cast) or a cast copy built on the meta device (no extra float32 copy)."""
    if dtype is None:
        return transformer
    from accelerate import init_empty_weights

    state = {k: v.detach().to(_param_dtype(k, dtype, keep_fp32)) if v.is_floating_point() else v
             for k, v in transformer.state_dict().items()}
    with init_empty_weights():
        copy = type(transformer).from_config(transformer.config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy


def _model_index(src: Path, transformer) -> dict:
    """``model_index.json`` of an ``AnyFlowPipeline`` (``AnyFlowFARPipeline`` for a causal transformer), the
    copied parts' classes taken from the source."""
    import diffusers

    source_index = json.loads((src / "model_index.json").read_text())
    index = {"_class_name": _pipeline_name(transformer), "_diffusers_version": diffusers.__version__}
    for part in COPIED_PARTS:
        entry = source_index.get(part)
        index[part] = entry if isinstance(entry, list) and entry[0] else _DEFAULT_ENTRIES[part]
    index["transformer"] = ["diffusers", type(transformer).__name__]
    index["scheduler"] = ["diffusers", "FlowMapEulerDiscreteScheduler"]
    return dict(sorted(index.items()))


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is set aside first and removed last."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return
    if not overwrite:
        raise FileExistsError(f"{out} appeared during the export; pass overwrite=True to replace it")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _readme(src: Path, shift: float, lora: LoraExport | None, dtype: torch.dtype | None, transformer) -> str:
    """The exported folder's ``README.md``: what it holds and how to load and sample it (``AnyFlowPipeline``,
    or for a causal student ``AnyFlowFARPipeline`` with :func:`anystep.patch_far_pipeline`)."""
    pipeline, model_class = _pipeline_name(transformer), type(transformer).__name__
    causal = pipeline == "AnyFlowFARPipeline"
    dtype_arg = f", torch_dtype={dtype}" if dtype is not None else ""
    load = ["import torch", *(["import anystep"] if causal else []), f"from diffusers import {pipeline}", "",
            f'pipe = {pipeline}.from_pretrained("path/to/this/folder"{dtype_arg})']
    if lora is not None:
        load.append('pipe.load_lora_weights("path/to/this/folder")  # the distilled student adapter')
    if causal:
        load.append("anystep.patch_far_pipeline(pipe)  # diffusers 0.42.1's KV-cache step: see below")
    load += ['video = pipe("a prompt", num_inference_steps=4, guidance_scale=1.0).frames[0]']
    if lora is None:
        variant = "The student's LoRA is merged into the transformer weights."
    else:
        variant = (f"The transformer is the **base** model; the trained student is the LoRA adapter in "
                   f"`{LORA_WEIGHT_NAME}` (rank {lora.rank}, trained with alpha {lora.alpha:g}: the scaling "
                   f"{lora.scaling:g} is folded into `lora_B`, so the file's alpha equals its rank). Without "
                   "`load_lora_weights` the pipeline runs the base, not the student. `pipe.fuse_lora()` "
                   "merges it for speed.")
    kind = str(dtype or "as trained").replace("torch.", "")
    what = ("A flow-map distilled causal (FAR) video model (AnyFlow, flow-map distillation of Wan2.1) that "
            "generates chunk by chunk with a KV cache of its own output" if causal else
            "A flow-map distilled text-to-video model (AnyFlow, flow-map distillation of Wan2.1)")
    intro = (f"{what}, in diffusers format: `{model_class}` + `FlowMapEulerDiscreteScheduler` "
             f"(shift {shift:g}, 1000 train steps); VAE, text encoder and tokenizer copied unchanged from "
             f"`{src.name}`. Transformer weights: {kind} (time embedder, norms and modulation tables float32 "
             "when cast).")
    steps = ("One checkpoint samples at any number of steps (`num_inference_steps`): 4 is the recommended "
             "default (the official demo's), and the official evaluation samples 2, 4, 8, 16 and 32 steps. "
             "Keep `guidance_scale=1.0` (guidance is distilled into the weights). The official demo samples "
             "480x832, 81 frames, and writes mp4 at 16 fps.")
    lines = ["# AnyFlow any-step video generator (anystep export)", "", intro, "", variant, "",
             "## Load and sample", "", "```python", *load, "```", "", steps, ""]
    if causal:
        lines += [_causal_notes(transformer), ""]
    return "\n".join(lines)


def _causal_notes(transformer) -> str:
    """The causal folder's extra README text: chunking, I2V / V2V, and why the pipeline needs the patch."""
    partition = list(transformer.config.chunk_partition)
    return (f"Each call generates the latent frames in chunks `{partition}` (the config's `chunk_partition`; "
            "pass `chunk_partition=` for another `num_frames`), every chunk with the full N-step schedule "
            "against the KV cache of the chunks before it. Image-to-video and video continuation: pass the "
            "first frame(s) as `video=` (whole chunks: 1 pixel frame for chunk 0).\n\n"
            "**`anystep.patch_far_pipeline(pipe)`** (from the `anystep` package that exported this folder) "
            "fixes a defect of diffusers 0.42.1: when it denoises a chunk against the KV cache, its "
            "`AnyFlowCausalAttnProcessor` pads queries and keys to a multiple of 128 tokens with zeros and no "
            "mask, so the zero keys take part in the softmax. At 480x832 (1560 tokens per latent frame) no "
            "chunk is a multiple of 128, and the stock pipeline does not sample what the model was trained "
            "to (official code, anystep's sampler). The patch installs anystep's attention processor on the "
            "causal blocks (unpadded attention on the cache read; flex attention on CUDA and dense SDPA on "
            "the CPU for the masked cache prefill); after it the pipeline gives anystep's "
            "`sample_causal` latents. See anystep's README, \"The causal (FAR) path\", for measured "
            "differences.")
