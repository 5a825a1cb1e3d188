"""Chunk-causal generation (the FAR student, official sec. 5): the contract a causal flow map fulfils, the
teacher-forcing split of Stage 1, and the chunk-by-chunk self-rollout with a KV cache used by Stage 2 (flow-map
backward simulation per chunk) and by sampling (T2V, and I2V / V2V when the first chunks are given).

A causal student generates a clip chunk by chunk (``chunk_partition``: latent frames per chunk). It is called
three ways (:class:`CausalFlowMap`): teacher-forced in Stage 1 (a :class:`TeacherForcing` condition carries the
clean context and the clean copies of the noisy chunks), bidirectionally (all frames as one chunk), and through
a :class:`KVCache` in a rollout. In a rollout every chunk attends to the cache of the chunks before it, which is
re-encoded from the rollout's own (detached) output after each chunk: at inference the student sees its own
history, and Stage 2 trains it there (the exposure-bias fix). Stage 1 instead gives it ground-truth history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from . import rng
from .backward_simulation import RolloutPlan, flowmap_backward_simulation
from .flowmap import sample


# ---------------------------------------------------------------------------------------------- the contract
@dataclass(frozen=True)
class TeacherForcing:
    """The condition of a teacher-forced (Stage-1) call of a causal student.

    ``text`` (B, L, D) prompt embeddings; ``clean`` (B, Fn, C, H, W) the clean copies of the noisy chunks the
    call denoises; ``context`` (B, Fc, C, H, W) the older chunks, clean (compressed by the model), or None when
    the clip has no chunk older than the model's window. Row selections, concatenation and prompt dropout act
    on all three together (:class:`~anystep.flowmap.BatchCondition`), so the Stage-1 objective handles it as it
    handles a plain prompt tensor; a dropped prompt keeps its clip's context."""

    text: torch.Tensor
    clean: torch.Tensor
    context: torch.Tensor | None = None

    def take_rows(self, idx: torch.Tensor | slice) -> TeacherForcing:
        ctx = None if self.context is None else self.context[idx]
        return TeacherForcing(self.text[idx], self.clean[idx], ctx)

    def cat(self, other: TeacherForcing) -> TeacherForcing:
        ctx = None if self.context is None else torch.cat([self.context, other.context])
        return TeacherForcing(torch.cat([self.text, other.text]), torch.cat([self.clean, other.clean]), ctx)

    def select(self, keep: torch.Tensor, null: TeacherForcing) -> TeacherForcing:
        """Row-wise this prompt where ``keep``, else ``null``'s; the clip (clean copies, context) stays."""
        mask = keep.to(self.text.device).view(-1, *([1] * (self.text.ndim - 1)))
        null_text = null.text.to(self.text.device).expand_as(self.text)
        return TeacherForcing(torch.where(mask, self.text, null_text), self.clean, self.context)

    @property
    def frames(self) -> int:
        """Frames of [context | noisy chunks] the call covers."""
        return self.clean.shape[1] + (0 if self.context is None else self.context.shape[1])


@runtime_checkable
class KVCache(Protocol):
    """A rollout's cache: ``prefill`` re-encodes the generated prefix (its chunks ``chunk_partition``) at
    t = r = 0 without gradient; a call gives u for the next chunk attending to the cache and itself."""

    def prefill(self, prefix: torch.Tensor, text: torch.Tensor, chunk_partition: Sequence[int]) -> None: ...

    def __call__(self, x_chunk: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class CausalFlowMap(Protocol):
    """A chunk-causal flow map (diffusers' ``AnyFlowFARTransformer3DModel`` behind
    :class:`~anystep.models.far.CausalStudent`): the chunk partition it generates, the number of newest chunks
    it holds at full resolution, and its three calls."""

    chunk_partition: tuple[int, ...]
    full_chunk_limit: int

    def __call__(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: TeacherForcing) -> torch.Tensor: ...

    def bidirectional(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...

    def cache(self) -> KVCache: ...


def is_causal(model: Any) -> bool:
    """Whether ``model`` is a causal flow map (a student generating chunk by chunk)."""
    return isinstance(model, CausalFlowMap)


# ---------------------------------------------------------------------------------------------- chunks
def chunk_bounds(chunk_partition: Sequence[int], frames: int | None = None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` frame ranges of a chunk partition (frames per chunk, in order), e.g. ``(1, 2, 2)``
    -> ``[(0, 1), (1, 3), (3, 5)]``. Raises unless every chunk has >= 1 frame and, when ``frames`` is given,
    they sum to it."""
    parts = tuple(chunk_partition)
    if not parts or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in parts):
        raise ValueError(f"a chunk partition is a non-empty list of integers >= 1, got {list(parts)}")
    if frames is not None and sum(parts) != frames:
        raise ValueError(f"chunk partition {list(parts)} covers {sum(parts)} frames, not the clip's {frames}")
    ends = torch.tensor(parts, device="cpu").cumsum(0).tolist()
    return [(end - k, end) for k, end in zip(parts, ends)]


def chunks_covering(chunk_partition: Sequence[int], frames: int) -> tuple[int, ...]:
    """The first chunks of ``chunk_partition`` that make exactly ``frames`` frames (an error otherwise)."""
    for c, (_, end) in enumerate(chunk_bounds(chunk_partition)):
        if end == frames:
            return tuple(chunk_partition[:c + 1])
    raise ValueError(f"{frames} frames are not a whole number of chunks of {list(chunk_partition)} (the first "
                     f"chunk has {chunk_partition[0]} frame(s))")


# ---------------------------------------------------------------------------------------------- Stage 1
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
    bounds = chunk_bounds(chunk_partition, x0.shape[1])
    n_context = k - min(k, full_chunk_limit)
    start, end = (bounds[n_context - 1][1] if n_context else 0), bounds[k - 1][1]
    return (x0[:, :start] if start else None), x0[:, start:end]


# ---------------------------------------------------------------------------------------------- rollouts
def self_rollout(student: CausalFlowMap, noise: torch.Tensor, text: torch.Tensor,
                 denoise: Callable[[Any, torch.Tensor, int], torch.Tensor],
                 given: torch.Tensor | None = None) -> torch.Tensor:
    """Generate chunk by chunk: ``denoise(flowmap, noise_chunk, index)`` turns a chunk's noise into the chunk,
    where ``flowmap(x, t, r, text)`` is the student attending to the KV cache of the chunks so far; the cache is
    re-encoded from the detached output after every chunk. ``given`` (B, Fg, C, H, W) are clean first frames
    (I2V: the first chunk; V2V: the first chunks) used instead of generating those chunks."""
    partition = student.chunk_partition
    bounds = chunk_bounds(partition, noise.shape[1])
    n_given = 0 if given is None else len(chunks_covering(partition, given.shape[1]))
    cache = student.cache()
    chunks = []
    for c, (start, end) in enumerate(bounds):
        if c < n_given:
            chunk = given[:, start:end].to(noise)
        else:
            chunk = denoise(lambda x, t, r, cond: cache(x, t.to(x.device), r.to(x.device), cond),
                            noise[:, start:end], c)
        chunks.append(chunk)
        if c < len(partition) - 1:
            cache.prefill(torch.cat(chunks, 1).detach(), text, partition[:c + 1])
    return torch.cat(chunks, 1)


@torch.no_grad()
def sample_causal(student: CausalFlowMap, noise: torch.Tensor, text: torch.Tensor,
                  steps: int | Sequence[float] = 4, *, shift: float = 5.0,
                  given: torch.Tensor | None = None) -> torch.Tensor:
    """Any-step causal sampling: every chunk with the N-step flow-map sampler against the cache (official
    ``FARWanAnyFlowPipeline``). T2V by default; ``given`` first frames make it I2V / V2V."""
    return self_rollout(student, noise, text, lambda u, x, c: sample(u, x, text, steps, shift=shift), given)


def causal_backward_simulation(student: CausalFlowMap, noise: torch.Tensor, text: torch.Tensor,
                               plan: RolloutPlan, *, shift: float = 5.0, grad: str = "all") -> torch.Tensor:
    """Stage 2's causal rollout: every chunk by flow-map backward simulation (<= 3 calls, gradients as in the
    bidirectional Stage 2), the context being the student's own detached output."""
    return self_rollout(student, noise, text, lambda u, x, c: flowmap_backward_simulation(
        u, x, text, plan, shift=shift, grad=grad))
