"""Random draws, all from CPU generators.

Every random number of a run comes from a ``torch.Generator`` on the CPU (or torch's global CPU generator when
``generator`` is None) and is drawn on that generator's device, then moved to where the data lives. So a run
draws the same numbers on a CPU and on a GPU, and no tensor lands on a device by accident: these helpers are
the only place the library draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def device_of(generator: torch.Generator | None) -> torch.device:
    """The device a draw from ``generator`` is made on (the CPU for torch's global generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


def uniform(shape: int | Sequence[int], generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) samples on the generator's device."""
    return torch.rand(_shape(shape), generator=generator, dtype=dtype, device=device_of(generator))


def normal(shape: int | Sequence[int], generator: torch.Generator | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, 1) samples on the generator's device."""
    return torch.randn(_shape(shape), generator=generator, dtype=dtype, device=device_of(generator))


def integers(low: int, high: int, shape: int | Sequence[int] = (),
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Integers uniform in [low, high) on the generator's device."""
    return torch.randint(low, high, _shape(shape), generator=generator, device=device_of(generator))


def permutation(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of 0..n-1 on the generator's device."""
    return torch.randperm(n, generator=generator, device=device_of(generator))


def noise_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape, drawn as float32 on the generator's device, then given ``x``'s
    device and dtype."""
    return normal(x.shape, generator).to(x)
