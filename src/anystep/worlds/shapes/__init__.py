"""The "shapes" toy video world: one coloured shape moving at constant speed, plus an exact judge.

A clip shows one shape (disk / square / triangle) of one colour gliding in a straight line at a
constant ``speed`` (pixels per frame) over a plain background; it never leaves the frame. Its
prompt is templated: ``"a red disk moving left"``. The package holds

* :mod:`.scene`: the world's vocabulary, :class:`ShapesConfig`, :class:`ClipSpec` and
  :class:`ShapesWorld`, the renderer and data source (clip specs, clips, per-prompt mean videos; the
  video conventions are in its docstring), plus :func:`causal_config`, the longer clips of the
  chunk-causal (FAR) path;
* :mod:`.judge`: :class:`ShapesJudge`, an exact, VBench-in-spirit judge built from a world. Quality
  (clean background, temporal consistency, smooth motion) and Semantic (colour, shape, direction
  right) sub-scores per clip in [0, 1], ``total = 0.8 quality + 0.2 semantic``
  (:meth:`ShapesJudge.judge`), and the same scores per chunk of a chunk partition
  (:meth:`ShapesJudge.judge_chunks`: does quality fall in late chunks?);
* :mod:`.text`: :class:`TextEmbedder`, a tiny deterministic word-vector "text encoder" (no downloads);
* :mod:`.data`: :class:`ShapesData`, the world as the trainer and the sweep see it (batches, conditions, a
  fixed evaluation set, its judge).

Everything is deterministic given a ``torch.Generator`` (or an int seed) and runs on the CPU.
"""

from .data import ShapesData
from .judge import JudgeConfig, ShapesJudge
from .scene import (
    BACKGROUNDS,
    CAUSAL_PARTITION,
    COLORS,
    DIRECTION_VECTORS,
    DIRECTIONS,
    SHAPES,
    ClipSpec,
    ShapesConfig,
    ShapesWorld,
    causal_config,
)
from .text import TextConfig, TextEmbedder

__all__ = [
    "BACKGROUNDS",
    "CAUSAL_PARTITION",
    "COLORS",
    "DIRECTIONS",
    "DIRECTION_VECTORS",
    "SHAPES",
    "ClipSpec",
    "JudgeConfig",
    "ShapesConfig",
    "ShapesData",
    "ShapesJudge",
    "ShapesWorld",
    "TextConfig",
    "TextEmbedder",
    "causal_config",
]
