"""The global batch and its parts.

``train.batch_size`` is the *global* batch: every optimizer step averages the loss over that many samples,
whatever the number of processes. Each process computes its share in ``accumulation`` micro-batches, so the
batch falls into ``count = world_size * accumulation`` equal parts, and process r's micro-batch j is part
``j * world_size + r`` (the processes' micro-batches j run at the same time: a *round*).

Every random draw of a step is made for the whole batch, from the same generator state on every process and in
every micro-batch, and cut to the part's rows (:mod:`anystep.rng` does the cutting). So the numbers a sample
sees do not depend on how the batch is split: 2 processes x 4 rows, 1 process x 2 micro-batches of 4, and
1 process x 8 rows compute the same losses, to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .flowmap import take_rows


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` equal parts of every global batch. The default is the whole batch."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"a part needs 0 <= index < count, got {self}")

    @property
    def whole(self) -> bool:
        return self.count == 1

    def rows(self, total: int) -> slice:
        """This part's rows of a global batch of ``total`` (which must split into ``count`` equal parts)."""
        if total % self.count:
            raise UsageError(f"a batch of {total} does not split into {self.count} equal parts (processes x "
                             "gradient accumulation); choose batch sizes (train.batch_size, a DMD batch size) "
                             "divisible by it")
        size = total // self.count
        return slice(self.index * size, (self.index + 1) * size)

    def take(self, x: Any, total: int) -> Any:
        """This part's rows of ``x``, a whole batch of ``total`` (a tensor or a batch-first condition)."""
        return x if self.whole else take_rows(x, self.rows(total))


WHOLE = Part()


def parts_of(rank: int, world_size: int, accumulation: int) -> list[Part]:
    """Process ``rank``'s micro-batches of every global batch, in the order it computes them."""
    count = world_size * accumulation
    return [Part(j * world_size + rank, count) for j in range(accumulation)]
