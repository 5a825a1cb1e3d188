"""The main job: from the shipped shapes teacher, AnyFlow's Stage 1 and Stage 2 and the two consistency baselines,
then one sweep of all of them beside the teacher's Euler sampler."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import RunConfig, resolve
from ..kinds import kind
from .sweep import SweepResult, sweep
from .train import train

SHORT = (800, 300, 800, 300)   # Stage 1, Stage 2, consistency distillation, consistency + DMD
FULL = (2400, 600, 2400, 600)
STAGES = (("Stage 1 (forward flow-map training) from the shipped teacher", "shapes_stage1", "stage1", None),
          ("Stage 2 (on-policy flow-map distillation) from Stage 1", "shapes_stage2", "stage2", "stage1"),
          ("baseline: consistency distillation from the shipped teacher", "shapes_consistency", "consistency", None),
          ("baseline: consistency backward simulation + DMD", "shapes_cbs", "consistency_dmd", "consistency"))


def demo_configs(out: str | Path = "runs/demo", budget: Sequence[int] = SHORT, baselines: bool = True,
                 overrides: Sequence[str] = ()) -> list[tuple[str, RunConfig]]:
    """The demo's stages (title, config), each in ``out/<stage>`` with its budget, ``overrides`` applied to all."""
    out = Path(out)
    configs = []
    for (title, preset, folder, init), steps in zip(STAGES[:4 if baselines else 2], budget):
        extra = [f"model.init={out / init}"] if init else []
        configs.append((title, resolve(preset, [f"train.out_dir={out / folder}", f"train.steps={steps}", *extra,
                                                *overrides])))
    return configs


def demo(out: str | Path = "runs/demo", budget: Sequence[int] = SHORT, baselines: bool = True,
         sequential: bool = False, overrides: Sequence[str] = (), progress: bool = True) -> SweepResult:
    """Train the demo's stages (AnyFlow's chain here and the baselines' in a second process, half the cores each,
    unless ``sequential`` or one core) and sweep them; every stage starts fresh. Returns the sweep."""
    configs = demo_configs(out, budget, baselines, overrides)
    total = len(configs) + 1
    chains = [list(enumerate(configs[:2], 1)), list(enumerate(configs[2:], 3))]
    cores = os.cpu_count() or 1
    if sequential or not chains[1] or cores < 2:
        train_chain(chains[0] + chains[1], total, None, progress)
    else:
        _two_processes(chains, total, max(1, cores // 2), progress)
    first = configs[0][1]
    print(f"[{total}/{total}] sweep N =", ",".join(map(str, first.sweep.steps)), flush=True)
    runs = [cfg.train.out_dir for _, cfg in configs]
    return sweep(runs, labels=[kind(cfg.kind).label for _, cfg in configs], out=Path(out) / "sweep",
                 progress=progress)


def train_chain(stages: list, total: int, threads: int | None, progress: bool) -> None:
    """Train ``[(index, (title, cfg)), ...]`` in order (each stage starts from the one before it), fresh."""
    torch.set_flush_denormal(True)  # as the CLI does: a spawned process starts afresh
    if threads:
        torch.set_num_threads(threads)  # a stage's own train.threads, if set, wins (train() applies it)
    for i, (title, cfg) in stages:
        t0 = time.time()
        print(f"[{i}/{total}] {title}: {cfg.train.steps} steps", flush=True)
        ckpt = train(cfg, progress=progress, overwrite=True, preset=STAGES[i - 1][1])
        print(f"      [{i}/{total}] done in {time.time() - t0:.0f} s: {ckpt}", flush=True)


def _two_processes(chains: list, total: int, threads: int, progress: bool) -> None:
    """AnyFlow's chain here, the baselines' in a spawned process: the chains are independent, and two one-thread
    processes beat one two-thread process on these tiny models."""
    import multiprocessing as mp

    print(f"training the AnyFlow chain here and the baselines in a second process ({threads} thread(s) each; "
          f"--sequential for one process)", flush=True)
    child = mp.get_context("spawn").Process(target=train_chain, args=(chains[1], total, threads, False))
    child.start()
    try:
        train_chain(chains[0], total, threads, progress)
    except BaseException:
        child.terminate()  # do not leave the baselines training after AnyFlow's chain failed
        raise
    finally:
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the baselines' process failed (exit code {child.exitcode}); see its message above")
