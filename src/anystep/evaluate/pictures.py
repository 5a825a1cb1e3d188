"""Pictures of samples, as a judge asks for them: a labelled grid video (video worlds; latents decoded by the
judge first, the real path) or a scatter of the first two coordinates coloured by class, the modes marked (the
gmm world)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..worlds.base import EvalSet, Judge
from .media import save_video_grid


def save_picture(judge: Judge, rows: dict[str, torch.Tensor], ev: EvalSet, path: Path) -> Path:
    """One picture of ``rows`` (name -> samples of ``ev``), written next to ``path``; returns the main file."""
    if judge.picture == "video":
        return save_video_grid(rows, path, columns=judge.labels(ev))
    if judge.picture == "decoded video":   # latents: the judge decodes them (the real path's VAE)
        return save_video_grid({k: judge.decode(v) for k, v in rows.items()}, path, columns=judge.labels(ev))
    if judge.picture == "scatter":
        return save_scatter(rows, ev.meta, judge.marks(), path)
    raise ValueError(f"unknown picture kind {judge.picture!r}")


def save_scatter(rows: dict[str, torch.Tensor], labels: torch.Tensor, marks: torch.Tensor, path: Path) -> Path:
    """A scatter per row of the samples' first two coordinates, coloured by ``labels``, ``marks`` as crosses."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = rows[name].flatten(1)
        ax.scatter(pts[:, 0], pts[:, 1], c=labels, s=3, cmap="tab10", vmin=0, vmax=9)
        ax.scatter(marks[:, 0], marks[:, 1], marker="x", c="k", s=20)
        ax.set_title(name, fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
