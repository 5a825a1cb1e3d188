"""The contract between an algorithm and the generic loop.

A :class:`Method` holds its trainable ``roles`` (name -> module) and returns, per iteration, a list of
:class:`Phase`: (the role whose optimizer steps, a function returning that role's loss terms and statistics).
The function takes a :class:`~anystep.global_batch.Part`: it computes that part's rows of every global batch
it draws and returns their means (the loop runs it once per micro-batch, from the same generator state each
time, and averages the gradients over parts and processes). A draw that is not per row (a rollout plan) is
made in :meth:`Method.phases`, once per iteration.
The loop (:mod:`anystep.train.loop`) does the rest: backward, clipping, the optimizer step, EMA, checks, logs
and checkpoints. A method's extra state (a random stream, a running mean) goes into checkpoints through
:meth:`Method.state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..global_batch import Part


@dataclass
class Phase:
    """``run(part)`` returns the part's loss terms and its statistics: numbers, or detached 0-dim tensors left
    on the device (the loop reads all of a phase's in one transfer; an ``.item()`` here would wait for the
    device once per statistic and micro-batch)."""

    role: str
    run: Callable[[Part], tuple[dict[str, torch.Tensor], dict[str, float | torch.Tensor]]]


@dataclass
class Method:
    roles: dict[str, nn.Module]

    def phases(self, step: int, generator: torch.Generator) -> list[Phase]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
