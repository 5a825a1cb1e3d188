"""Atomic, resumable checkpoints.

A checkpoint is a folder ``step_000123/`` holding

* ``<role>.safetensors`` - the trainable roles' weights (what users load),
* ``<role>_ema.safetensors`` - their EMA weights,
* ``trainer.pt`` - optimizer, LR-scheduler, RNG and method state, and the step,
* ``config.yaml`` - the resolved run config.

It is written into a temporary folder, fsynced, then renamed into place, and ``latest`` (a one-line text
file) is replaced atomically afterwards: a crash leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]],
                    trainer_state: dict[str, Any], config_yaml: str, keep: int = 2) -> Path:
    """Write ``root/step_{step:06d}`` atomically, point ``root/latest`` at it, prune old ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp_step_{step:06d}_"))
    try:
        for name, tensors in weights.items():
            save_tensors(tensors, tmp / f"{name}.safetensors")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / "latest", final.name + "\n")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run / checkpoints folder (its ``latest``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    for root in (path, path / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            target = root / latest.read_text().strip()
            if not target.is_dir():
                raise CheckpointError(f"{latest} points to {target.name}, which does not exist")
            return target
    if path.is_dir() and any(path.glob("*.safetensors")):
        return path
    raise CheckpointError(f"no checkpoint in {path}: expected a step_* folder with .safetensors files or a "
                          "'latest' pointer")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path}: {err}") from err


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / "trainer.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated / garbage pickles
        raise CheckpointError(f"corrupt checkpoint file {path}: {err}") from err


def load_module(module: torch.nn.Module, path: Path, strict: bool = True) -> None:
    """Load a safetensors file into a module with a clear error on mismatch."""
    state = load_tensors(path)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}")
    bad = [k for k in state if k in own and own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"{path} does not fit this model: shape mismatch for {bad[:5]}")
    module.load_state_dict(state, strict=strict)
