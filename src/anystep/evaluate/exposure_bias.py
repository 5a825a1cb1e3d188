"""Exposure bias, measured: a causal student's last chunks continued from its own history and from real history.

A causal (FAR) student generates chunk k against a KV cache of the chunks before it. Stage 1 trains it on real
histories (teacher forcing); at sampling the history is its own output. Exposure bias is the quality that this
difference costs in the chunks that follow: with ``Q_k`` the world's exact judge's quality of chunk k,

    E = mean over the last ``tail`` chunks of  Q_k(continued from the real first chunks) - Q_k(own rollout)

from the same noises and prompts (``sample_causal(..., given=real first frames)`` against a plain rollout).
E > 0: the student continues real clips better than its own, what on-policy training (Stage 2, which rolls
out on its own outputs) is meant to remove. Unlike the sweep's ``late_gap`` (early minus late chunks of one
rollout), E does not mix in how hard late chunks are in themselves: both terms score the same chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..causal import chunks_covering, sample_causal


def chunk_scores(judge: Any, clips: torch.Tensor, specs: Sequence[Any], partition: Sequence[int]) -> dict[str, list[float]]:
    """Every score of the judge's per-chunk judge (quality, consistency, smoothness, drift, ...) of every chunk,
    averaged over the clips: ``{score: [chunk 0, chunk 1, ...]}``."""
    scores = judge.judge_chunks(clips.clamp(-1, 1), specs, partition)
    return {k: v.mean(0).tolist() for k, v in scores.items()}


def exposure_bias(student: Any, judge: Any, real: torch.Tensor, noise: torch.Tensor, cond: Any,
                  specs: Sequence[Any], steps: Sequence[int], *, shift: float, tail: int = 1,
                  batch: int = 64) -> list[dict[str, Any]]:
    """Per N in ``steps``: the per-chunk quality of the student's own rollout and of its continuation of the real
    clips ``real`` (their first chunks given, the last ``tail`` generated), and E (module docstring); with every
    per-chunk score of both (``own_scores``, ``continued_scores``: :func:`chunk_scores`), which say *what* the late
    chunks lose. ``noise``, ``cond``: the evaluation set's noises and conditions (rows of ``real``); ``specs``: what
    the judge reads."""
    partition = tuple(student.chunk_partition)
    if not 1 <= tail < len(partition):
        raise ValueError(f"tail must leave at least one given chunk: 1 <= tail < {len(partition)}, got {tail}")
    given = sum(partition[:-tail])
    if len(chunks_covering(partition, given)) != len(partition) - tail:
        raise ValueError(f"{given} given frames do not end on a chunk boundary of {partition}")

    def rollout(n: int, prefix: torch.Tensor | None) -> torch.Tensor:
        out = []
        for i in range(0, noise.shape[0], batch):
            rows = slice(i, i + batch)
            c = cond[rows]
            out.append(sample_causal(student, noise[rows], c, n, shift=shift,
                                     given=None if prefix is None else prefix[rows]))
        return torch.cat(out)

    rows = []
    for n in steps:
        own_scores = chunk_scores(judge, rollout(n, None), specs, partition)
        cont_scores = chunk_scores(judge, rollout(n, real[:, :given]), specs, partition)
        own, cont = own_scores["quality"], cont_scores["quality"]
        late_own, late_real = sum(own[-tail:]) / tail, sum(cont[-tail:]) / tail
        rows.append({"N": n, "own_chunks": own, "continued_chunks": cont, "late_own": late_own,
                     "late_continued": late_real, "exposure_bias": late_real - late_own,
                     "own_scores": own_scores, "continued_scores": cont_scores})
    return rows
