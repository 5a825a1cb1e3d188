"""The worlds anystep trains in: one table from a world's name to its config sections, its data source and its
network family. Adding a world is one module (a :class:`~anystep.worlds.base.World`, and a
:class:`~anystep.worlds.base.Judge` if it has one) and one line in :data:`WORLDS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import EvalSet, Judge, OnDevice, World
from .gmm import GMMConfig, GMMData
from .shapes import ShapesConfig, ShapesData, TextConfig
from .wan import WanData, WanWorldConfig


@dataclass(frozen=True)
class WorldEntry:
    sections: dict[str, type]            # its config sections, world.<section>
    make: Callable[..., World]           # the world, from those sections (keyword arguments)
    network: str                         # its family in anystep.models.zoo
    exact_teacher: bool = False          # has an analytic velocity (World.exact_teacher), 'teacher=exact'


WORLDS: dict[str, WorldEntry] = {
    "shapes": WorldEntry({"shapes": ShapesConfig, "text": TextConfig}, ShapesData, "toy_wan"),
    "gmm": WorldEntry({"gmm": GMMConfig}, GMMData, "mlp", exact_teacher=True),
    "wan": WorldEntry({"wan": WanWorldConfig}, WanData, "wan"),
}


def make_world(name: str, sections: dict[str, Any]) -> World:
    """The world ``name`` built from its config sections."""
    return WORLDS[name].make(**sections)


__all__ = ["WORLDS", "EvalSet", "Judge", "OnDevice", "World", "WorldEntry", "make_world"]
