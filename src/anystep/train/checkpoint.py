"""Atomic, resumable checkpoints, and the run folder they live in.

A checkpoint is a folder ``checkpoints/step_000123/`` holding

* ``<role>.safetensors`` - the trainable roles' weights (what users load),
* ``<role>_ema.safetensors`` - their EMA weights,
* ``trainer.pt`` - optimizer, LR-scheduler, RNG and method state, and the step: tensors and plain containers
  only, read with ``torch.load(weights_only=True)`` (a file holding other Python objects is refused: loading
  it could run code),
* ``config.yaml`` - the resolved run config,
* ``COMPLETE`` - written last: the step and the save's sequence number in this folder (JSON).

What a ``kill -9`` at any point leaves is safe to read and to resume from:

* a checkpoint is written into ``.tmp_step_*`` and renamed to ``step_*`` once every file, ``COMPLETE`` last,
  is fsynced. Readers take the newest *complete* checkpoint (the highest sequence number); ``latest`` is a
  one-line pointer kept for people and scripts, never trusted;
* saving a step again renames the old folder to ``.replaced_step_*`` first and deletes it only once the new
  one is in place; until then readers still take the old one;
* pruning renames a checkpoint to ``.trash_*`` (a name no reader takes) before deleting it;
* :func:`clean_run_folder` (at the start of training, under the run's lock) removes or restores what a kill
  left behind.

Folders and files get the permissions a plain ``mkdir`` / ``open`` gives under the process umask.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import re
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UsageError

CHECKPOINTS = "checkpoints"      # a run folder's checkpoints
MARKER = "COMPLETE"              # written last into a checkpoint
_STEP_NAME = re.compile(r"step_(\d+)$")


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, unsafe to load, or does not fit the run."""


class RunFolderError(UsageError):
    """A run folder that cannot be trained into: not writable, in use by another run, or holding checkpoints
    that a fresh run would mix with."""


# ---------------------------------------------------------------------------------------------- test hook
_FAULT = os.environ.get("ANYSTEP_FAULT")


def fault_point(point: str, step: int) -> None:
    """Test hook (the kill drill, tests/test_kill_drill.py): with ``ANYSTEP_FAULT=<point>:<step>`` in the
    environment the process SIGKILLs itself when it reaches ``point`` while making step ``step``. Points:
    ``mid_step`` (after an optimizer step), ``checkpoint_write`` (weights written, the rest not yet),
    ``replace_old`` (a re-saved step's old folder renamed away, the new one not yet in place),
    ``before_pointer`` (renamed into place, ``latest`` not yet updated), ``during_prune`` (an old checkpoint
    renamed away, not yet deleted). ``<point>:<step>@<rank>`` kills only that process of a ``torchrun`` job.
    Unset, it costs one comparison."""
    if _FAULT and _FAULT in (f"{point}:{step}", f"{point}:{step}@{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent``, made by a plain mkdir (mode 0o777 less the umask)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: written to ``.<name>.<random>``, fsynced, renamed over, so a
    reader sees the old or the new text, never a part. The file's mode is that of a plain ``open``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _discard(path: Path, step: int | None = None) -> None:
    """Delete folder ``path``: renamed to ``.trash_*`` first (a name no reader takes), so a kill part-way leaves
    no half-deleted checkpoint behind a checkpoint's name; :func:`clean_run_folder` finishes the job."""
    trash = path.with_name(f".trash_{path.name.lstrip('.')}_{secrets.token_hex(4)}")
    os.replace(path, trash)
    if step is not None:
        fault_point("during_prune", step)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- saving
def save_checkpoint(root: Path, step: int, weights: dict[str, dict[str, torch.Tensor]],
                    trainer_state: dict[str, Any], files: dict[str, str], keep: int = 2) -> Path:
    """Write ``root/step_{step:06d}`` (each role's ``weights`` as safetensors, the trainer state, and the text
    ``files`` such as ``config.yaml``; replacing one of that step), point ``root/latest`` at it, and prune all
    but the ``keep`` newest checkpoints (0 keeps all). A kill at any point leaves every complete checkpoint
    readable: the new one is complete or absent, an old one is never half deleted."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = _new_dir(root, f".tmp_{final.name}_")
    try:
        _write_checkpoint_files(tmp, step, weights, trainer_state, files, _next_sequence(root))
        _put_in_place(tmp, final, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("before_pointer", step)
    write_text_atomic(root / "latest", final.name + "\n")
    _prune(root, keep, final, step)
    return final


def _write_checkpoint_files(folder: Path, step: int, weights: dict[str, dict[str, torch.Tensor]],
                            trainer_state: dict[str, Any], files: dict[str, str], sequence: int) -> None:
    """Every file of a checkpoint into ``folder``, each fsynced, with the folder's permissions less execute;
    the ``COMPLETE`` marker last."""
    for name, tensors in weights.items():
        save_tensors(tensors, folder / f"{name}.safetensors")
    fault_point("checkpoint_write", step)
    torch.save(trainer_state, folder / "trainer.pt")
    for name, text in files.items():
        (folder / name).write_text(text)
    mode = folder.stat().st_mode & 0o666      # what open() gives under this umask (safetensors writes 0600)
    for f in folder.iterdir():
        os.chmod(f, mode)
        _fsync_file(f)
    marker = folder / MARKER
    marker.write_text(json.dumps({"step": step, "sequence": sequence}) + "\n")
    _fsync_file(marker)
    _fsync_dir(folder)


def _put_in_place(tmp: Path, final: Path, step: int) -> None:
    """Rename ``tmp`` to ``final``. An existing ``final`` is first renamed to ``.replaced_<name>`` and deleted
    only once the new one is in place (after a kill in between, readers still take it and
    :func:`clean_run_folder` puts it back)."""
    old = final.with_name(f".replaced_{final.name}")
    if final.exists():
        if old.exists():
            _discard(old)      # stale: an earlier kill came after its replacement was in place
        os.replace(final, old)
        fault_point("replace_old", step)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    if old.exists():
        _discard(old)


def _prune(root: Path, keep: int, current: Path, step: int) -> None:
    """All but the ``keep`` newest checkpoints (and ``current``) renamed away, then deleted."""
    if keep <= 0:
        return
    folders = sorted((p for p in root.glob("step_*") if p.is_dir() and _STEP_NAME.match(p.name)), key=_age)
    for old in folders[:-keep]:
        if old != current:
            _discard(old, step)


# ---------------------------------------------------------------------------------------------- finding
def _sequence(folder: Path) -> int | None:
    """The save's sequence number from the folder's ``COMPLETE`` marker; None without a marker (being written,
    or written before markers existed)."""
    try:
        text = (folder / MARKER).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return int(json.loads(text)["sequence"])
    except (ValueError, KeyError, TypeError):
        return 0          # a marker is only written once everything else is on disk: complete nonetheless


def _age(folder: Path) -> tuple[int, int]:
    """Sort key, oldest first: the save's sequence number (-1 without a marker), then the step."""
    seq = _sequence(folder)
    return (-1 if seq is None else seq), int(_STEP_NAME.search(folder.name).group(1))


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints in a checkpoints folder, oldest first (in the order they were saved). A
    ``.replaced_step_*`` folder counts while its replacement is not in place."""
    root = Path(root)
    found: dict[str, Path] = {}
    for p in root.glob("step_*"):
        if _STEP_NAME.match(p.name) and _sequence(p) is not None:
            found[p.name] = p
    for p in root.glob(".replaced_step_*"):
        name = p.name[len(".replaced_"):]
        if _STEP_NAME.match(name) and name not in found and not (root / name).exists() and _sequence(p) is not None:
            found[name] = p
    return sorted(found.values(), key=_age)


def _next_sequence(root: Path) -> int:
    ckpts = complete_checkpoints(root)
    return _age(ckpts[-1])[0] + 1 if ckpts else 1


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint of a checkpoints folder, or None. A run written before checkpoints had
    a ``COMPLETE`` marker is read through its ``latest`` pointer."""
    ckpts = complete_checkpoints(root)
    if ckpts:
        return ckpts[-1]
    latest = Path(root) / "latest"
    if not latest.is_file():
        return None
    target = Path(root) / latest.read_text().strip()
    if not (_STEP_NAME.match(target.name) and target.is_dir()):
        raise CheckpointError(f"{latest} points to {target.name}, which does not exist")
    return target


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given (it holds .safetensors files), or the newest complete checkpoint of a run
    folder or of its checkpoints folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and any(path.glob("*.safetensors")):
        return path
    for root in (path, path / CHECKPOINTS):
        found = newest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint in {path}: expected a run folder with a complete checkpoint, or a "
                          "checkpoint folder (step_*) with .safetensors files")


# ---------------------------------------------------------------------------------------------- loading
def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"corrupt checkpoint file {path}: {err}") from err


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer.pt`` read with ``weights_only=True``: tensors and plain containers only; a file holding other
    Python objects is refused (CheckpointError) without running any of it."""
    path = Path(ckpt) / "trainer.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:   # what the weights-only unpickler refused, e.g. a class or function
        detail = re.search(r"(Unsupported global: GLOBAL \S+|WeightsUnpickler error: \s*\S.*)", str(err))
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain trainer state of tensors and containers"
            f"{f' ({detail.group(1)})' if detail else ''}, and unpickling anything else could run code; "
            "anystep never writes such a file") from None
    except Exception as err:  # torch raises several types for truncated / garbage files
        raise CheckpointError(f"corrupt checkpoint file {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"corrupt checkpoint file {path}: not a trainer state")
    return state


def fitting_tensors(path: Path, own: dict[str, torch.Tensor], strict: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, checked against a module's state dict ``own``: a one-line CheckpointError names
    the first missing and unexpected keys (``strict``) and mismatching shapes (checkpoint vs model)."""
    state = load_tensors(path)
    problems = []
    if strict:
        for what, keys in (("missing", [k for k in own if k not in state]),
                           ("unexpected", [k for k in state if k not in own])):
            if keys:
                problems.append(f"{len(keys)} {what} key(s), e.g. {', '.join(keys[:3])}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
           for k in state if k in own and own[k].shape != state[k].shape]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es) (checkpoint vs model), e.g. {', '.join(bad[:3])}")
    if problems:
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(problems)}")
    return state


def load_module(module: torch.nn.Module, path: Path, strict: bool = True) -> None:
    """Load a safetensors file into a module with a clear error on mismatch."""
    module.load_state_dict(fitting_tensors(path, module.state_dict(), strict), strict=strict)


# ---------------------------------------------------------------------------------------------- run folder
@contextlib.contextmanager
def lock_run_folder(out_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on run folder ``out_dir`` (created when missing) for the ``with`` block:
    ``flock`` on ``out_dir/.lock``, released on exit and by the system when the process dies. RunFolderError
    at once when the folder cannot be written or another process holds it."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RunFolderError(f"cannot write to the run folder {out} (train.out_dir): "
                             f"{err.strerror or err}") from None
    try:
        for folder in (out, out / CHECKPOINTS):
            if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
                raise RunFolderError(f"cannot write to {folder} (train.out_dir): permission denied")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"the run folder {out} is in use by another training run (it holds "
                                 f"{out / '.lock'}); wait for it or choose another train.out_dir") from None
        yield out
    finally:
        os.close(fd)


def clean_run_folder(out_dir: str | Path) -> None:
    """Finish what a kill left undone in a run folder (call it under :func:`lock_run_folder`): a checkpoint
    displaced by a re-save whose replacement never came goes back in place; unfinished checkpoints
    (``.tmp_step_*``), half-deleted ones (``.trash_*``) and temporary files of atomic writes are deleted;
    ``latest`` is pointed at the newest complete checkpoint."""
    out = Path(out_dir)
    root = out / CHECKPOINTS
    for old in root.glob(".replaced_step_*"):
        final = root / old.name[len(".replaced_"):]
        if final.exists():
            _discard(old)
        else:
            os.replace(old, final)
    for folder in (out, root):
        for p in [*folder.glob(".tmp_step_*"), *folder.glob(".trash_*")]:
            shutil.rmtree(p, ignore_errors=True)
    for p in [*root.glob(".latest.*"), *out.glob(".metrics.csv.*"), *out.glob(".config.yaml.*"),
              *out.glob(".origin.yaml.*")]:
        p.unlink(missing_ok=True)
    ckpts = complete_checkpoints(root)
    latest = root / "latest"
    if ckpts and (not latest.is_file() or latest.read_text().strip() != ckpts[-1].name):
        write_text_atomic(latest, ckpts[-1].name + "\n")


def clear_run_folder(out_dir: str | Path) -> None:
    """Start over in ``out_dir``: its checkpoints, metrics, validation, tracker logs (TensorBoard, wandb), config,
    origin and report are deleted (folders renamed away first, so a kill leaves no half-deleted checkpoint)."""
    out = Path(out_dir)
    for name in (CHECKPOINTS, "tensorboard", "wandb", "validation"):
        if (out / name).is_dir():
            _discard(out / name)
    for name in ("metrics.csv", "config.yaml", "origin.yaml", "report.md"):
        (out / name).unlink(missing_ok=True)


def checkpoint_to_resume(out_dir: str | Path, resume: bool | str | Path = False, if_present: bool = False,
                         overwrite: bool = False) -> Path | None:
    """The checkpoint a run in ``out_dir`` starts from (None: from scratch), decided before any model is built.
    ``resume``: True for the run's newest complete checkpoint (an error when there is none), or a checkpoint
    path; ``if_present``: the newest complete checkpoint when there is one, else None. A fresh start refuses a
    folder that holds checkpoints (RunFolderError) unless ``overwrite``."""
    if sum(map(bool, (resume, if_present, overwrite))) > 1:
        raise ValueError("resume, resume-if-present and overwrite exclude one another")
    if resume and resume is not True:
        return find_checkpoint(resume)
    root = Path(out_dir) / CHECKPOINTS
    newest = newest_checkpoint(root) if root.is_dir() else None
    if resume and newest is None:
        raise CheckpointError(f"nothing to resume: {root} holds no complete checkpoint yet; start without "
                              "--resume, or use --resume-if-present (resumes only when there is one)")
    if resume or if_present:
        return newest
    if not overwrite and (newest is not None or any(root.glob("step_*"))):
        raise RunFolderError(f"{out_dir} already holds a run's checkpoints"
                             f"{f' (newest: {newest.name})' if newest else ''}: continue it with --resume, or "
                             "start over with --overwrite (deletes them), or choose another train.out_dir")
    return None
