"""Typed run configuration: dataclasses with paper defaults, YAML presets, dotted command-line overrides.

Unknown keys raise (a typo never silently does nothing). ``resolve(preset, ["train.steps=100", ...])``
returns a :class:`RunConfig`; ``to_yaml`` prints it back (``--dry-run``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .objectives.flowmap import Stage1Config
from .worlds.gmm import GMMConfig
from .worlds.shapes import ShapesConfig


@dataclass
class TextConfig:
    """The shapes world's deterministic text embedder."""

    dim: int = 32
    max_tokens: int = 8


@dataclass
class WorldConfig:
    name: str = "shapes"  # 'shapes' (video world) or 'gmm' (exact world)
    gmm: GMMConfig = field(default_factory=GMMConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self):
        if self.name not in ("shapes", "gmm"):
            raise ValueError(f"world.name must be 'shapes' or 'gmm', got {self.name!r}")


@dataclass
class ModelConfig:
    """The network. ``init`` is a checkpoint to start from (a teacher for Stage 1); the shapes world uses a
    tiny diffusers Wan transformer, the gmm world a small MLP."""

    init: str | None = None
    gate_value: float = 0.25          # g in (1 - g) E_t(t) + g E_r(r)
    deltatime_type: str = "r"         # the delta embedder sees r ('r') or t - r ('t-r')
    # shapes (Wan transformer)
    patch: tuple[int, int, int] = (1, 2, 2)
    heads: int = 4
    head_dim: int = 16
    layers: int = 4
    ffn_dim: int = 256
    # gmm (MLP)
    hidden: int = 256
    depth: int = 4
    max_freq: float = 50.0


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then constant; official teacher / Stage-1 values."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup_steps: int = 1000       # EMA equals the weights until this step (official ShardEMA)


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 32
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    out_dir: str = "runs/run"
    threads: int | None = None         # torch.set_num_threads; None leaves torch's default


@dataclass
class TeacherConfig:
    """The teacher fine-tune (plain flow matching)."""

    shift: float = 5.0
    cond_dropout: float = 0.1


@dataclass
class SweepConfig:
    steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    num_samples: int = 256
    seed: int = 1234
    teacher_guidance: float = 3.0      # the teacher's Euler sampler uses CFG (the student has it fused)
    student_guidance: float = 1.0
    shift: float = 5.0
    grid_samples: int = 4              # videos per row in the grid
    teacher: bool = True               # also sweep the teacher's Euler sampler


@dataclass
class RunConfig:
    kind: str = "stage1"               # 'teacher' or 'stage1'
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        if self.kind not in ("teacher", "stage1"):
            raise ValueError(f"kind must be 'teacher' or 'stage1', got {self.kind!r}")


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass, strictly
# --------------------------------------------------------------------------------------------------
def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ``ValueError`` naming the key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {path + unknown[0]!r}; valid keys here: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, path + name)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key {path!r} is a section; give it as a mapping, got {value!r}")
        return from_dict(tp, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, path) for v in value)
        if len(args) != len(value):
            raise ValueError(f"config key {path!r} needs {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, path) for a, v in zip(args, value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or tp is int and not isinstance(value, int):
        raise ValueError(f"config key {path!r} needs an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"config key {path!r} needs true/false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ValueError(f"config key {path!r} needs a string, got {value!r}")
    if tp is float and not isinstance(value, float):
        raise ValueError(f"config key {path!r} needs a number, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# presets and overrides
# --------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("anystep.configs").iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset name (``shapes_stage1``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
    else:
        res = resources.files("anystep.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ValueError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {name_or_path!r} must be a YAML mapping")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into the nested dict."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def resolve(preset: str | None, overrides: list[str] = ()) -> RunConfig:
    data = load_preset(preset) if preset else {}
    for item in overrides:
        apply_override(data, item)
    return from_dict(RunConfig, data)
