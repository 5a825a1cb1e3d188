"""Chunk-causal generation (the FAR student, official sec. 5): the teacher-forcing split of Stage 1, and the
chunk-by-chunk self-rollout with a KV cache used by Stage 2 (flow-map backward simulation per chunk) and by
sampling (T2V, and I2V / V2V when the first chunks are given).

In a rollout every chunk attends to the cache of the chunks before it, which is re-encoded from the rollout's
own (detached) output after each chunk: at inference the student sees its own history, and Stage 2 trains it
there (the exposure-bias fix). Stage 1 instead gives it ground-truth history (teacher forcing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import rng
from .backward_simulation import RolloutPlan, flowmap_backward_simulation
from .flowmap import sample


def draw_num_chunks(num_chunks: int, full_chunk_limit: int, long_context_ratio: float,
                    generator: torch.Generator | None = None) -> int:
    """K, the chunks of a Stage-1 clip (official ``sample_latents``): with probability ``long_context_ratio``
    K ~ U{limit..num_chunks}, else K = limit (the last ``limit`` chunks are noisy, older ones context)."""
    limit = min(full_chunk_limit, num_chunks)
    if float(rng.uniform((), generator)) < long_context_ratio:
        return int(rng.integers(limit, num_chunks + 1, (), generator))
    return limit


def teacher_forcing_split(x0: torch.Tensor, chunk_partition: Sequence[int], k: int,
                          full_chunk_limit: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The first ``k`` chunks of clips ``x0`` (B, F, C, H, W) split into (compressed clean context or None,
    the newest ``min(k, limit)`` chunks: the noisy targets, whose clean copies are themselves)."""
    if not 1 <= k <= len(chunk_partition):
        raise ValueError(f"k = {k} chunks is outside 1..{len(chunk_partition)}")
    if sum(chunk_partition) != x0.shape[1]:
        raise ValueError(f"chunk_partition {list(chunk_partition)} covers {sum(chunk_partition)} frames, the clips "
                         f"have {x0.shape[1]}")
    n_context = k - min(k, full_chunk_limit)
    start, end = sum(chunk_partition[:n_context]), sum(chunk_partition[:k])
    return (x0[:, :start] if start else None), x0[:, start:end]


def teacher_forcing_cond(text: Any, targets: torch.Tensor, context: torch.Tensor | None) -> dict:
    """The FAR student's teacher-forcing condition (:class:`~anystep.models.far_student.FARStudent`)."""
    cond = {"text": text, "clean": targets}
    if context is not None:
        cond["context"] = context
    return cond


def self_rollout(student, noise: torch.Tensor, text: torch.Tensor,
                 denoise: Callable[[Any, torch.Tensor, int], torch.Tensor],
                 given: torch.Tensor | None = None) -> torch.Tensor:
    """Generate chunk by chunk: ``denoise(flowmap, noise_chunk, index)`` turns a chunk's noise into the chunk,
    where ``flowmap(x, t, r, text)`` is the student attending to the KV cache of the chunks so far; the cache is
    re-encoded from the detached output after every chunk. ``given`` (B, Fg, C, H, W) are clean first frames
    (I2V: the first chunk; V2V: the first chunks) used instead of generating those chunks."""
    partition = student.chunk_partition
    if sum(partition) != noise.shape[1]:
        raise ValueError(f"the student's chunk_partition {list(partition)} covers {sum(partition)} frames, "
                         f"the noise has {noise.shape[1]}")
    n_given = _given_chunks(partition, given)
    cache = student.cache()
    chunks, start = [], 0
    for c, n in enumerate(partition):
        if c < n_given:
            chunk = given[:, start:start + n].to(noise)
        else:
            chunk = denoise(lambda x, t, r, cond: cache(x, t.to(x.device), r.to(x.device), cond),
                            noise[:, start:start + n], c)
        chunks.append(chunk)
        start += n
        if c < len(partition) - 1:
            cache.prefill(torch.cat(chunks, 1).detach(), text, partition[:c + 1])
    return torch.cat(chunks, 1)


@torch.no_grad()
def sample_causal(student, noise: torch.Tensor, text: torch.Tensor, steps: int | Sequence[float] = 4, *,
                  shift: float = 5.0, given: torch.Tensor | None = None) -> torch.Tensor:
    """Any-step causal sampling: every chunk with the N-step flow-map sampler against the cache (official
    ``FARWanAnyFlowPipeline``). T2V by default; ``given`` first frames make it I2V / V2V."""
    return self_rollout(student, noise, text, lambda u, x, c: sample(u, x, text, steps, shift=shift), given)


def causal_backward_simulation(student, noise: torch.Tensor, text: torch.Tensor, plan: RolloutPlan, *,
                               shift: float = 5.0, grad: str = "all") -> torch.Tensor:
    """Stage 2's causal rollout: every chunk by flow-map backward simulation (<= 3 calls, gradients as in the
    bidirectional Stage 2), the context being the student's own detached output."""
    return self_rollout(student, noise, text, lambda u, x, c: flowmap_backward_simulation(
        u, x, text, plan, shift=shift, grad=grad))


def _given_chunks(partition: Sequence[int], given: torch.Tensor | None) -> int:
    if given is None:
        return 0
    total = 0
    for c, n in enumerate(partition):
        total += n
        if total == given.shape[1]:
            return c + 1
    raise ValueError(f"the given {given.shape[1]} frames must be whole chunks of {list(partition)} (I2V: the first "
                     f"{partition[0]} frame(s))")
