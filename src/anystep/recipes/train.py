"""Train one run: lock its folder, clean what a kill left, resume or start, train, checkpoint."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from ..build import build_trainer
from ..config import RunConfig, to_yaml
from ..lineage import resolve_lineage
from ..train import distributed
from ..train.checkpoint import (
    CheckpointError,
    checkpoint_to_resume,
    clean_run_folder,
    clear_run_folder,
    lock_run_folder,
    write_text_atomic,
)

ORIGIN = "origin.yaml"


@dataclass
class Origin:
    """Where a run came from, kept in its folder (``origin.yaml``): the preset (a name or YAML file; None: the
    config defaults) and overrides it was resolved from (None: not recorded), the number of processes and the
    working directory it started in (relative paths in its config are relative to it)."""

    preset: str | None
    overrides: list[str] | None
    processes: int = 1
    cwd: str = field(default_factory=os.getcwd)


def read_origin(out: Path) -> Origin | None:
    """A run folder's :class:`Origin`, or None when it has none (a run trained before it was recorded); a
    CheckpointError when the file is not one."""
    path = Path(out) / ORIGIN
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
        return Origin(**{k: data[k] for k in ("preset", "overrides", "processes", "cwd") if k in data})
    except (yaml.YAMLError, TypeError) as err:
        raise CheckpointError(f"corrupt {path}: {err}") from None


def train(cfg: RunConfig, resume: bool | str = False, progress: bool = True, *, resume_if_present: bool = False,
          overwrite: bool = False, preset: str | None = None, overrides: Sequence[str] | None = None) -> Path:
    """Run (or resume) training; returns the final checkpoint folder.

    ``resume``: True for the run's newest complete checkpoint, or a checkpoint path; ``resume_if_present``:
    resume when the run has a complete checkpoint, else start fresh; ``overwrite``: start over in a folder
    holding a run (deleted once the model is built), which a fresh start refuses otherwise. ``preset`` and
    ``overrides``: what ``cfg`` was resolved from, recorded in the run folder's ``origin.yaml`` when the run starts
    (``anystep report`` diffs the config against that preset). The lineage is
    checked and the folder's problems raised before anything is written or built; the folder is locked for the
    whole run. ``train.threads``, when set, becomes this process's torch thread count.

    Under ``torchrun`` every process runs this: rank 0 alone locks, cleans and writes the folder and decides
    where the run starts; all build the same model, resume the same checkpoint and train their share."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resolve_lineage(cfg)      # a lineage that does not fit fails before the run folder is touched
    out = Path(cfg.train.out_dir)
    with distributed.session(cfg.train.device) as processes, _locked(out, processes.main):
        origin = Origin(preset, list(overrides) if overrides is not None else None, processes.world_size)
        return _train(cfg, out, processes, resume, progress, resume_if_present, overwrite, origin)


def _train(cfg: RunConfig, out: Path, processes, resume, progress: bool, resume_if_present: bool,
           overwrite: bool, origin: Origin) -> Path:
    """Build the trainer, resume it if asked, train; the trainer is gone when this returns (before the
    process group is left)."""
    start = processes.decide(lambda: _prepare(out, resume, resume_if_present, overwrite))
    trainer = build_trainer(cfg, progress, processes)
    if processes.many and processes.main:
        print(f"{processes.world_size} processes, networks "
              f"{'sharded (FSDP2)' if trainer.sharded else 'replicated'}, {len(trainer.parts)} micro-batch(es) "
              "per process and step", flush=True)
    if overwrite and processes.main:
        clear_run_folder(out)
    processes.barrier()
    if start is not None:
        trainer.resume(start)
    if processes.main:
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
        if start is None or not (out / ORIGIN).is_file():   # a resumed run keeps where it came from
            write_text_atomic(out / ORIGIN, yaml.safe_dump(asdict(origin), sort_keys=False))
    last = trainer.fit()
    return last if last is not None else trainer.last_checkpoint


def _locked(out: Path, main: bool):
    """The run folder's lock, held by the process that writes (rank 0)."""
    return lock_run_folder(out) if main else contextlib.nullcontext(out)


def _prepare(out: Path, resume: bool | str, resume_if_present: bool, overwrite: bool) -> Path | None:
    """Clean what a kill left in the folder; the checkpoint the run starts from (None: from scratch)."""
    clean_run_folder(out)
    return checkpoint_to_resume(out, resume, resume_if_present, overwrite)
