"""The step-scaling sweep: one set of noises and conditions, every N, the world's exact judge.

Rows are samplers: each student at N steps (flow-map Euler, r = next t, its fused guidance, so scale 1; a causal
student chunk by chunk), the teacher's Euler sampler (r = t, with CFG) and the consistency baselines (predict x0,
re-noise). Outputs: ``sweep.md`` and ``sweep.csv`` (a row per sampler and N), ``sweep.png`` (each metric against
N, log-x) and a picture of samples with one row per sampler and N.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..causal import is_causal, sample_causal
from ..flowmap import FlowMap, guided, sample, sample_consistency, take_rows
from ..worlds.base import Judge, World
from .pictures import save_picture


@dataclass
class SweepConfig:
    """The step-scaling sweep: the step counts, how many fixed noises and conditions, and the samplers' guidance."""

    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_samples: int = 256
    seed: int = 1234
    teacher_guidance: float = 3.0      # the teacher's Euler sampler uses CFG (the student has it fused)
    student_guidance: float = 1.0
    shift: float = 5.0                 # the sampling grids' shift (official 5)
    grid_samples: int | None = None    # samples per row of the picture (None: the judge's choice, 4 clips /
                                       # 1000 points)
    teacher: bool = True               # also sweep the teacher's Euler sampler
    teacher_steps: int = 50            # wan world: the teacher's Euler steps of the reference the students are
                                       # judged against (evaluate/real_judge.py)
    clip: str | None = None            # wan world: a local CLIP folder for the clip_score column (None: no CLIP)
    device: str = "cpu"                # where the samplers (and a VAE, a CLIP) run: cpu, cuda, cuda:N or auto;
                                       # the judges score CPU copies of the samples
    batch_size: int = 64               # clips sampled at once (a real Wan clip wants a few)

    def guidance_for(self, role: str) -> float:
        """The CFG scale ``role``'s network samples with: a student's ``student_guidance`` (1: its guidance is
        fused), any other role's (a teacher, a critic) ``teacher_guidance``."""
        return self.student_guidance if role == "student" else self.teacher_guidance

    def __post_init__(self):
        if not self.steps or min(self.steps) < 1 or self.num_samples < 1 or not self.shift > 0:
            raise ValueError(f"sweep needs steps >= 1, num_samples >= 1 and shift > 0, got {self}")
        if self.teacher_steps < 1 or self.batch_size < 1:
            raise ValueError(f"sweep.teacher_steps and sweep.batch_size must be >= 1, got {self.teacher_steps} and "
                             f"{self.batch_size}")


# How a run's product samples (its kind's ``sampler``): each a function of (model with guidance applied,
# noise, cond, N, shift, generator for re-noising). A causal student samples chunk by chunk whatever its kind.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "flowmap": lambda u, x, c, n, shift, g: sample(u, x, c, n, shift=shift),
    "euler": lambda u, x, c, n, shift, g: sample(u, x, c, n, shift=shift, mean_velocity=False),
    "consistency": lambda u, x, c, n, shift, g: sample_consistency(u, x, c, n, shift=shift, generator=g),
}


@dataclass
class Sampler:
    """A row of a sweep: a model, the CFG scale it samples with (1: a student's fused guidance) and how it
    samples (a key of :data:`SAMPLERS`)."""

    name: str
    model: FlowMap
    guidance: float
    mode: str = "flowmap"

    def __post_init__(self):
        if self.mode not in SAMPLERS:
            raise ValueError(f"sampler mode must be one of {list(SAMPLERS)}, got {self.mode!r}")
        if is_causal(self.model) and (self.mode != "flowmap" or self.guidance != 1.0):
            raise ValueError("a causal student samples chunk by chunk with its flow map and fused guidance (1)")


def sample_batched(s: Sampler, null_cond: Any, noise: torch.Tensor, cond: Any, steps: int, shift: float,
                   chunk: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sample in chunks on ``device`` (the model's); the samples come back on the CPU, where the judges run.
    The consistency sampler's re-noising draws from a CPU generator seeded by ``seed``."""
    null_cond = null_cond.to(device) if torch.is_tensor(null_cond) else null_cond
    model = guided(s.model, s.guidance, null_cond)
    generator = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, noise.shape[0], chunk):
        x, c = noise[i:i + chunk].to(device), take_rows(cond, slice(i, i + chunk))
        c = c.to(device) if torch.is_tensor(c) else c
        if is_causal(s.model):
            outs.append(sample_causal(s.model, x, c, steps, shift=shift))
        else:
            outs.append(SAMPLERS[s.mode](model, x, c, steps, shift, generator))
    return torch.cat(outs).cpu()


def run_sweep(samplers: list[Sampler], world: World, judge: Judge, cfg: SweepConfig, out_dir: str | Path,
              guidance: float = 1.0, chunk_partition: tuple[int, ...] | None = None,
              progress: bool = True) -> list[dict[str, Any]]:
    """Sweep every sampler over ``cfg.steps`` on one evaluation set of ``world``, scored by its ``judge``; write
    the table (``sweep.md``, ``sweep.csv``), the plot (``sweep.png``) and a picture of samples (``grid.*``) into
    ``out_dir``. ``guidance``: the CFG scale of an exact reference (the gmm endpoint error);
    ``chunk_partition``: the causal students' chunks, for per-chunk scores."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = world.eval_set(cfg.num_samples, cfg.seed)
    rows: list[dict[str, Any]] = []
    grid: dict[str, torch.Tensor] = {}
    shown = cfg.grid_samples or judge.picture_samples
    jobs = [(s, n) for s in samplers for n in cfg.steps]
    bar = tqdm(jobs, desc="sweep", disable=not progress, dynamic_ncols=True)
    for s, n in bar:
        bar.set_postfix_str(f"{s.name} N={n}")
        x = sample_batched(s, world.null_cond, ev.noise, ev.cond, n, cfg.shift, chunk=cfg.batch_size,
                           seed=cfg.seed + n, device=cfg.device)
        rows.append({"sampler": s.name, "N": n, **judge.score(x, ev, guidance, chunk_partition)})
        grid[f"{s.name} N={n}"] = x[:shown]
    write_table(rows, out / "sweep")
    plot_sweep(rows, out / "sweep.png", judge.primary_metric)
    save_picture(judge, grid, ev.head(shown), out / "grid")
    return rows


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    return [k for k in rows[0] if k not in ("sampler", "N")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names = metric_names(rows)
    lines = ["| sampler | N | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['N']} | " + " | ".join(f"{r[k]:.4f}" for k in names) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict[str, Any]], stem: Path) -> None:
    stem.with_suffix(".md").write_text(markdown_table(rows))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["sampler", "N", *metric_names(rows)])
        w.writeheader()
        w.writerows(rows)


def plot_sweep(rows: list[dict[str, Any]], path: Path, primary: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(rows)
    names = [primary] + [n for n in names if n != primary]
    cols = min(4, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    for ax, metric in zip(axes.flat, names):
        for s in samplers:
            pts = [(r["N"], r[metric]) for r in rows if r["sampler"] == s]
            ax.plot(*zip(*pts), marker="o", label=s, linestyle="--" if "teacher" in s else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps N")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
