"""The step-scaling sweep: one set of noises and conditions, every N, the world's exact metrics.

Rows are samplers: each student at N steps (flow-map Euler, r = next t, its fused guidance, so scale 1), the
teacher's Euler sampler (r = t, with CFG) and the consistency baselines (predict x0, re-noise). Outputs: ``sweep.md`` and ``sweep.csv`` (a row per sampler
and N), ``sweep.png`` (each metric against N, log-x) and a grid of samples with one row per N.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..causal import sample_causal
from ..config import SweepConfig
from ..flowmap import FlowMap, guided, sample, sample_consistency


@dataclass
class Sampler:
    name: str
    model: FlowMap
    guidance: float
    mode: str = "flowmap"   # 'flowmap' (r = next t), 'euler' (a velocity model, r = t), 'consistency',
                            # 'causal' (a FAR student, chunk by chunk with a KV cache)

    def __post_init__(self):
        if self.mode not in ("flowmap", "euler", "consistency", "causal"):
            raise ValueError(f"sampler mode must be 'flowmap', 'euler', 'consistency' or 'causal', got {self.mode!r}")
        if self.mode == "causal" and self.guidance != 1.0:
            raise ValueError("the causal sampler runs the student with its fused guidance (guidance 1)")


def sample_batched(s: Sampler, null_cond: Any, noise: torch.Tensor, cond: Any, steps: int, shift: float,
                   chunk: int = 64, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sample in chunks on ``device`` (the model's); the samples come back on the CPU, where the judges run.
    The consistency sampler's re-noising draws from a CPU generator seeded by ``seed``."""
    null_cond = null_cond.to(device) if torch.is_tensor(null_cond) else null_cond
    model = guided(s.model, s.guidance, null_cond)
    generator = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, noise.shape[0], chunk):
        x, c = noise[i:i + chunk].to(device), cond[i:i + chunk]
        c = c.to(device) if torch.is_tensor(c) else c
        if s.mode == "consistency":
            outs.append(sample_consistency(model, x, c, steps, shift=shift, generator=generator))
        elif s.mode == "causal":
            outs.append(sample_causal(s.model, x, c, steps, shift=shift))
        else:
            outs.append(sample(model, x, c, steps, shift=shift, mean_velocity=s.mode == "flowmap"))
    return torch.cat(outs).cpu()


def run_sweep(samplers: list[Sampler], binding: Any, cfg: SweepConfig, out_dir: str | Path,
              eval_guidance: float = 1.0, progress: bool = True) -> list[dict[str, Any]]:
    """Sweep every sampler over ``cfg.steps``; write table, plot and grid into ``out_dir``. ``eval_guidance``
    is the guidance of the exact reference ODE (gmm endpoint error)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = binding.eval_set(cfg.num_samples, cfg.seed)
    rows: list[dict[str, Any]] = []
    grid: dict[str, torch.Tensor] = {}
    jobs = [(s, n) for s in samplers for n in cfg.steps]
    bar = tqdm(jobs, desc="sweep", disable=not progress, dynamic_ncols=True)
    for s, n in bar:
        bar.set_postfix_str(f"{s.name} N={n}")
        x = sample_batched(s, binding.null_cond, ev.noise, ev.cond, n, cfg.shift, seed=cfg.seed + n)
        metrics = binding.evaluate(x, ev, eval_guidance)
        rows.append({"sampler": s.name, "N": n, **metrics})
        grid[f"{s.name} N={n}"] = x[:cfg.grid_samples]
    write_table(rows, out / "sweep")
    plot_sweep(rows, out / "sweep.png", binding.primary_metric)
    grid_ev = type(ev)(ev.noise[:cfg.grid_samples], ev.cond[:cfg.grid_samples], ev.meta[:cfg.grid_samples])
    binding.save_picture(grid, grid_ev, out / "grid")
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
