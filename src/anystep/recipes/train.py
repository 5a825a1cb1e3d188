"""Train one run: lock its folder, clean what a kill left, resume or start, train, checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from ..build import build_trainer
from ..config import RunConfig, to_yaml
from ..lineage import resolve_lineage
from ..train.checkpoint import (
    checkpoint_to_resume,
    clean_run_folder,
    clear_run_folder,
    lock_run_folder,
    write_text_atomic,
)


def train(cfg: RunConfig, resume: bool | str = False, progress: bool = True, *, resume_if_present: bool = False,
          overwrite: bool = False) -> Path:
    """Run (or resume) training; returns the final checkpoint folder.

    ``resume``: True for the run's newest complete checkpoint, or a checkpoint path; ``resume_if_present``:
    resume when the run has a complete checkpoint, else start fresh; ``overwrite``: start over in a folder
    holding a run (deleted once the model is built), which a fresh start refuses otherwise. The lineage is
    checked and the folder's problems raised before anything is written or built; the folder is locked for the
    whole run. ``train.threads``, when set, becomes this process's torch thread count."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    resolve_lineage(cfg)      # a lineage that does not fit fails before the run folder is touched
    out = Path(cfg.train.out_dir)
    with lock_run_folder(out):
        clean_run_folder(out)
        start = checkpoint_to_resume(out, resume, resume_if_present, overwrite)
        trainer = build_trainer(cfg, progress)
        if overwrite:
            clear_run_folder(out)
        if start is not None:
            trainer.resume(start)
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
        last = trainer.fit()
    return last if last is not None else trainer.last_checkpoint
