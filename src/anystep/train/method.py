"""The contract between an algorithm and the generic loop.

A :class:`Method` holds its trainable ``roles`` (name -> module) and returns, per iteration, a list of
:class:`Phase`: (the role whose optimizer steps, a function returning that role's loss terms and statistics).
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


@dataclass
class Phase:
    role: str
    run: Callable[[], tuple[dict[str, torch.Tensor], dict[str, float]]]


@dataclass
class Method:
    roles: dict[str, nn.Module]

    def phases(self, step: int, generator: torch.Generator) -> list[Phase]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
