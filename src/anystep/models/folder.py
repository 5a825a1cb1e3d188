"""Loading models from local diffusers folders (Wan2.1 T2V, or a released AnyFlow folder).

anystep never downloads weights: every model path is a local folder in diffusers layout
(``model_index.json`` + ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``). A hub id such as
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` gets an error that says how to make the local folder.

Released AnyFlow folders come in two metadata layouts, both accepted everywhere a folder is read:

* the diffusers layout (later ``nvidia/AnyFlow-*-Diffusers`` uploads, and anystep's exports): transformer
  ``AnyFlowTransformer3DModel`` / ``AnyFlowFARTransformer3DModel``, pipeline ``AnyFlowPipeline`` /
  ``AnyFlowFARPipeline``, scheduler ``FlowMapEulerDiscreteScheduler``;
* the official code's layout (the first uploads, written by NVlabs/AnyFlow's
  ``scripts/convert_model/convert_anyflow_to_diffusers.py``): one transformer class
  ``FAR_Wan_Transformer3DModel`` for both variants, told apart by its config flag ``init_far_model``, with
  ``init_flowmap_model`` set; pipeline ``WanAnyFlowPipeline`` / ``FARWanAnyFlowPipeline``; scheduler
  ``far.schedulers...FlowMapDiscreteScheduler``. Its weights carry exactly the diffusers classes' state-dict
  keys (diffusers' own converter loads the official ``ema`` state into them unchanged), so only the config
  is translated (:func:`legacy_transformer_config`) and the weights are loaded strictly.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import torch


class ModelFolderError(FileNotFoundError):
    """A model path that is not a usable local diffusers folder."""


KINDS = {"WanTransformer3DModel": "wan", "AnyFlowTransformer3DModel": "anyflow",
         "AnyFlowFARTransformer3DModel": "anyflow_far"}
LEGACY_TRANSFORMER = "FAR_Wan_Transformer3DModel"       # the official code's class, both variants
LEGACY_PIPELINES = {"WanAnyFlowPipeline": "AnyFlowPipeline", "FARWanAnyFlowPipeline": "AnyFlowFARPipeline"}
# legacy config keys with the only value diffusers' AnyFlow classes implement (they hard-code it)
_LEGACY_FIXED = {"qk_norm": "rms_norm_across_heads", "added_kv_proj_dim": None,
                 "pos_embed_seq_len": None}   # the last: a Wan2.1 key the converter's base config may carry
_LEGACY_FLAGS = ("init_far_model", "init_flowmap_model")   # what to build; no diffusers counterpart
_FAR_ONLY = ("compressed_patch_size", "full_chunk_limit", "chunk_partition")


def require_local_folder(path: str | Path, part: str | None = None) -> Path:
    """``path`` as a local diffusers folder (with ``part/`` inside when given), or a clear error."""
    p = Path(path).expanduser()
    if not p.exists():
        text = str(path)
        looks_like_hub = text.count("/") == 1 and not text.startswith((".", "/", "~"))
        hint = (f" {text!r} looks like a model-hub id; anystep never downloads weights. Download it once "
                f"(e.g. `huggingface-cli download {text} --local-dir models/{text.split('/')[-1]}`) and pass "
                f"the local path." if looks_like_hub else "")
        raise ModelFolderError(f"model folder not found: {text}.{hint}")
    if not p.is_dir():
        raise ModelFolderError(f"model path {p} is not a folder (expected a diffusers folder)")
    if part is not None and not (p / part).is_dir():
        raise ModelFolderError(f"{p} has no {part}/ subfolder (expected a diffusers pipeline folder with "
                               f"model_index.json, transformer/, vae/, text_encoder/, tokenizer/)")
    return p


def transformer_config(folder: str | Path) -> tuple[Path, dict]:
    """The transformer's ``config.json`` (``folder/transformer/`` or ``folder`` itself) and its contents."""
    p = require_local_folder(folder)
    for cfg in (p / "transformer" / "config.json", p / "config.json"):
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except json.JSONDecodeError as err:
                raise ModelFolderError(f"corrupt transformer config {cfg}: {err}") from err
            if not isinstance(config, dict) or "_class_name" not in config:
                raise ModelFolderError(f"corrupt transformer config {cfg}: no _class_name")
            return cfg, config
    raise ModelFolderError(f"{p} has no transformer/config.json")


def transformer_class_name(folder: str | Path) -> str:
    """The diffusers class of the folder's transformer: the ``_class_name`` of its config, with the official
    code's ``FAR_Wan_Transformer3DModel`` read as ``AnyFlowFARTransformer3DModel`` (``init_far_model``) or
    ``AnyFlowTransformer3DModel``."""
    cfg, config = transformer_config(folder)
    name = config["_class_name"]
    if name == LEGACY_TRANSFORMER:
        return legacy_transformer_config(config, cfg)[0]
    return name


def transformer_kind(folder: str | Path) -> str:
    """``"wan"`` (a Wan2.1 velocity model), ``"anyflow"`` (bidirectional flow map) or ``"anyflow_far"``
    (causal flow map), whichever metadata layout the folder has; an unknown class is an error."""
    return KINDS[_supported(transformer_class_name(folder), folder)]


def _supported(name: str, folder: str | Path) -> str:
    if name not in KINDS:
        raise ModelFolderError(f"{folder}: transformer class {name!r} is not supported; expected one of "
                               f"{sorted(KINDS)} or the official {LEGACY_TRANSFORMER}")
    return name


def legacy_transformer_config(config: dict, where: str | Path = "config.json") -> tuple[str, dict]:
    """``(diffusers class name, its constructor config)`` of an official-layout ``FAR_Wan_Transformer3DModel``
    config (NVlabs/AnyFlow ``far/models/transformer_far_wan_model.py``).

    Translation: ``init_far_model`` picks the class (FAR, or bidirectional); ``init_flowmap_model`` must be
    set (without it the model has no delta embedder: a plain Wan velocity model); both flags are dropped, as
    are the private ``_class_name`` / ``_diffusers_version`` / ``_name_or_path``. ``qk_norm`` and
    ``added_kv_proj_dim`` (and the Wan key ``pos_embed_seq_len``) are dropped when they hold the only value
    diffusers implements, else refused. The bidirectional class drops the FAR keys ``compressed_patch_size``,
    ``full_chunk_limit`` and ``chunk_partition`` (a null ``chunk_partition`` leaves diffusers' default). Every
    other key (sizes, ``gate_value``, ``deltatime_type``, ...) keeps its name and value; a key the diffusers
    class does not know is an error naming it."""
    import diffusers

    if not config.get("init_flowmap_model"):
        raise ModelFolderError(f"{where}: a {LEGACY_TRANSFORMER} without init_flowmap_model is the official "
                               "code's plain velocity model, not an AnyFlow flow map")
    far = bool(config.get("init_far_model"))
    name = "AnyFlowFARTransformer3DModel" if far else "AnyFlowTransformer3DModel"
    mapped = {}
    for key, value in config.items():
        if key.startswith("_") or key in _LEGACY_FLAGS or (not far and key in _FAR_ONLY):
            continue
        if key in _LEGACY_FIXED:
            if value != _LEGACY_FIXED[key]:
                raise ModelFolderError(f"{where}: {key}={value!r} is not supported by diffusers' {name} "
                                       f"(it implements {key}={_LEGACY_FIXED[key]!r})")
            continue
        if key == "chunk_partition" and value is None:
            continue
        mapped[key] = value
    known = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"}
    unknown = sorted(set(mapped) - known)
    if unknown:
        raise ModelFolderError(f"{where}: config keys {unknown} of {LEGACY_TRANSFORMER} have no counterpart in "
                               f"diffusers' {name}")
    return name, mapped


def load_transformer(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The transformer of a Wan2.1 or AnyFlow diffusers folder (``WanTransformer3DModel``,
    ``AnyFlowTransformer3DModel`` or ``AnyFlowFARTransformer3DModel``; either AnyFlow metadata layout);
    ``folder`` may also be the ``transformer/`` folder itself."""
    import diffusers

    p = require_local_folder(folder)
    cfg, config = transformer_config(p)
    cls = getattr(diffusers, _supported(transformer_class_name(p), p))
    if config["_class_name"] == LEGACY_TRANSFORMER:
        model = _load_legacy(cls, legacy_transformer_config(config, cfg)[1], cfg.parent, dtype)
        model.register_to_config(_name_or_path=str(p))   # as from_pretrained records it
        return model
    sub = {"subfolder": "transformer"} if (p / "transformer").is_dir() else {}
    return cls.from_pretrained(p, torch_dtype=dtype, **sub)


def _load_legacy(cls, config: dict, weights_dir: Path, dtype: torch.dtype):
    """``cls`` from an official-layout transformer folder: diffusers' ``from_pretrained`` on a staging folder
    holding the translated ``config.json`` beside links to the original weight files (nothing copied), after
    checking that the weights hold exactly the class's state-dict keys."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        expected = set(cls.from_config(config).state_dict())
    _check_weight_keys(weights_dir, expected, cls.__name__)
    with tempfile.TemporaryDirectory(prefix="anystep-legacy-") as tmp:
        staging = Path(tmp)
        (staging / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **config}, indent=2))
        for f in weights_dir.iterdir():
            if f.name != "config.json":
                (staging / f.name).symlink_to(f.resolve())
        return cls.from_pretrained(staging, torch_dtype=dtype)


def _check_weight_keys(weights_dir: Path, expected: set[str], class_name: str) -> None:
    """Raise unless the folder's safetensors weights hold exactly ``expected`` (a strict load)."""
    from safetensors import safe_open

    files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        raise ModelFolderError(f"{weights_dir} has no .safetensors weights")
    found = set()
    for f in files:
        with safe_open(f, framework="pt") as handle:
            found |= set(handle.keys())
    if found != expected:
        raise ModelFolderError(f"{weights_dir}: the weights do not match {class_name}: unexpected "
                               f"{sorted(found - expected)[:4]}, missing {sorted(expected - found)[:4]}")
