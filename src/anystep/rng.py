"""Random draws, all from CPU generators.

Every random number of a run comes from a ``torch.Generator`` on the CPU (or torch's global CPU generator when
``generator`` is None) and is drawn on that generator's device, then moved to where the data lives. So a run
draws the same numbers on a CPU and on a GPU, and no tensor lands on a device by accident: these helpers are
the only place the library draws.

With ``part`` (a :class:`~anystep.global_batch.Part`), ``shape[0]`` is the part's number of rows: the draw is
made for the whole batch (``count`` times as many rows) and the part's rows are returned, so every split of a
batch draws the same numbers for the same sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .global_batch import Part


def device_of(generator: torch.Generator | None) -> torch.device:
    """The device a draw from ``generator`` is made on (the CPU for torch's global generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _whole(shape: int | Sequence[int], part: Part | None) -> tuple[int, ...]:
    """The shape of the whole batch's draw for a part's ``shape``."""
    shape = _shape(shape)
    return shape if part is None or part.whole else (shape[0] * part.count, *shape[1:])


def _cut(x: torch.Tensor, part: Part | None) -> torch.Tensor:
    return x if part is None or part.whole else x[part.rows(x.shape[0])]


def uniform(shape: int | Sequence[int], generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float32, part: Part | None = None) -> torch.Tensor:
    """U[0, 1) samples on the generator's device."""
    return _cut(torch.rand(_whole(shape, part), generator=generator, dtype=dtype, device=device_of(generator)),
                part)


def normal(shape: int | Sequence[int], generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float32, part: Part | None = None) -> torch.Tensor:
    """N(0, 1) samples on the generator's device."""
    return _cut(torch.randn(_whole(shape, part), generator=generator, dtype=dtype, device=device_of(generator)),
                part)


def integers(low: int, high: int, shape: int | Sequence[int] = (),
             generator: torch.Generator | None = None, part: Part | None = None) -> torch.Tensor:
    """Integers uniform in [low, high) on the generator's device."""
    return _cut(torch.randint(low, high, _whole(shape, part), generator=generator, device=device_of(generator)),
                part)


def permutation(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of 0..n-1 on the generator's device."""
    return torch.randperm(n, generator=generator, device=device_of(generator))


@contextlib.contextmanager
def replay(generator: torch.Generator) -> Iterator[None]:
    """Draws inside the block leave ``generator`` as they found it: what follows draws the same numbers again
    (a step reads the conditions of rows of the batch it then draws)."""
    state = generator.get_state()
    try:
        yield
    finally:
        generator.set_state(state)


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None, part: Part | None = None) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape, drawn as float32 on the generator's device, then given ``x``'s
    device and dtype (``x``: a part's rows)."""
    return normal(x.shape, generator, part=part).to(x)
