"""Validation during training: the step-scaling sweep, small, every few steps.

Every ``validation.every`` steps and at the end, the EMA of the run's product (the student; a teacher run's
teacher) samples one fixed set of noises and conditions (``validation.num_samples`` of its world's evaluation
set, seed ``validation.seed``) at each of ``validation.steps``, its kind's way (a flow map with fused guidance,
a causal student chunk by chunk, a teacher with Euler and CFG, a consistency model by re-noising), and the
world's judge scores each N: the exact judges of the toy worlds, the teacher-agreement, flicker (and CLIP)
metrics on the real path, against the teacher's many-step samples made once per run. Each validation writes
``validation/step_XXXXXX/`` in the run folder: ``metrics.json`` (a row per N), a labelled picture (rows: N,
columns: prompts) and, on the real path, nothing more; its scalars ``val/N{n}/{metric}`` and its cost
``time/validation_sec`` join the run's metrics.

Under ``torchrun`` every process samples the same rows (the networks may be sharded: their forward passes are
collective) and rank 0 judges and writes. The sampling settings (shift, the teacher's CFG scale and steps, a CLIP
folder) are the run's ``sweep`` settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..causal import is_causal
from ..evaluate.pictures import save_picture
from ..evaluate.sweep import Sampler, SweepConfig, sample_batched
from ..worlds.base import EvalSet, Judge
from .checkpoint import write_text_atomic

FOLDER = "validation"


@dataclass
class ValidationConfig:
    """When and how a run validates itself (0 steps between validations: never)."""

    every: int = 500                          # steps between validations (and one at the end); 0: off
    steps: tuple[int, ...] = (1, 4, 16)       # sampling steps N of each validation
    num_samples: int = 4                      # fixed noises and conditions (prompts)
    seed: int = 4321                          # of the noises and conditions

    def __post_init__(self):
        self.steps = tuple(self.steps)
        if self.every < 0 or self.num_samples < 1 or not self.steps or min(self.steps) < 1:
            raise ValueError(f"validation needs every >= 0 (0: off), num_samples >= 1 and steps >= 1, got {self}")


def due(cfg: ValidationConfig, step: int, last_step: int) -> bool:
    """Whether the run validates after ``step`` (every ``every`` steps and at the last one)."""
    return cfg.every > 0 and (step % cfg.every == 0 or step == last_step)


class Validation:
    """Samples the product at every N and judges it; ``judge`` is made on first use (the real path's teacher
    reference is sampled then, once per run)."""

    def __init__(self, cfg: ValidationConfig, sampler: Sampler, world: Any, sweep: SweepConfig,
                 make_judge: Callable[[EvalSet], Judge], out_dir: str | Path, *, guidance: float = 1.0,
                 main: bool = True):
        self.cfg, self.sampler, self.world, self.sweep = cfg, sampler, world, sweep
        self.make_judge, self.folder, self.guidance, self.main = make_judge, Path(out_dir) / FOLDER, guidance, main
        self.ev = world.eval_set(cfg.num_samples, cfg.seed)
        self._judge: Judge | None = None

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            self._judge = self.make_judge(self.ev)
        return self._judge

    def due(self, step: int, last_step: int) -> bool:
        return due(self.cfg, step, last_step)

    @torch.no_grad()
    def __call__(self, step: int, device: torch.device) -> tuple[dict[str, float], Path | None]:
        """Sample, judge and write validation ``step``; the scalars to log and the picture (rank 0; the other
        processes sample and get ``({}, None)``)."""
        t0 = time.time()
        judge = self.judge
        partition = self.sampler.model.chunk_partition if is_causal(self.sampler.model) else None
        samples = {n: sample_batched(self.sampler, self.world.null_cond, self.ev.noise, self.ev.cond, n,
                                     self.sweep.shift, seed=self.cfg.seed + n, device=device)
                   for n in self.cfg.steps}
        if not self.main:
            return {}, None
        rows = [{"N": n, **judge.score(x, self.ev, self.guidance, partition)} for n, x in samples.items()]
        folder = self.folder / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        shown = min(self.cfg.num_samples, judge.picture_samples)
        picture = save_picture(judge, {f"N={n}": x[:shown] for n, x in samples.items()}, self.ev.head(shown),
                               folder / "grid")
        seconds = time.time() - t0
        write_text_atomic(folder / "metrics.json", json.dumps({
            "step": step, "rows": rows, "primary_metric": judge.primary_metric,
            "higher_is_better": judge.higher_is_better, "seconds": seconds, "picture": picture.name,
            "sampler": self.sampler.name, "num_samples": self.cfg.num_samples}, indent=1))
        stats = {f"val/N{r['N']}/{k}": float(v) for r in rows for k, v in r.items() if k != "N"}
        stats["time/validation_sec"] = seconds
        return stats, picture


def summary(stats: dict[str, float], primary: str, steps: tuple[int, ...]) -> str:
    """One line for the log: the primary metric at each N and what the validation cost."""
    figures = ", ".join(f"N={n} {stats[f'val/N{n}/{primary}']:.4g}" for n in steps if f"val/N{n}/{primary}" in stats)
    return f"{primary}: {figures} ({stats['time/validation_sec']:.1f} s)"
