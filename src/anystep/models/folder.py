"""Loading models from local diffusers folders (Wan2.1 T2V, or a released AnyFlow folder).

anystep never downloads weights: every model path is a local folder in diffusers layout
(``model_index.json`` + ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``). A hub id such as
``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` gets an error that says how to make the local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class ModelFolderError(FileNotFoundError):
    """A model path that is not a usable local diffusers folder."""


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


def transformer_class_name(folder: str | Path) -> str:
    """The ``_class_name`` of ``folder/transformer/config.json`` (or of ``folder/config.json``)."""
    p = require_local_folder(folder)
    for cfg in (p / "transformer" / "config.json", p / "config.json"):
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text())["_class_name"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ModelFolderError(f"corrupt transformer config {cfg}: {err}") from err
    raise ModelFolderError(f"{p} has no transformer/config.json")


def load_transformer(folder: str | Path, dtype: torch.dtype = torch.float32):
    """The transformer of a Wan2.1 or AnyFlow diffusers folder (``WanTransformer3DModel`` or
    ``AnyFlowTransformer3DModel``); ``folder`` may also be the ``transformer/`` folder itself."""
    from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel

    p = require_local_folder(folder)
    classes = {"WanTransformer3DModel": WanTransformer3DModel, "AnyFlowTransformer3DModel": AnyFlowTransformer3DModel}
    name = transformer_class_name(p)
    if name not in classes:
        raise ModelFolderError(f"{p}: transformer class {name!r} is not supported; expected one of {sorted(classes)}")
    sub = {"subfolder": "transformer"} if (p / "transformer").is_dir() else {}
    return classes[name].from_pretrained(p, torch_dtype=dtype, **sub)
