"""A run's configuration, composed from its components' configs: YAML presets, dotted overrides, strict parsing.

A run's config holds the sections its kind uses and nothing else (:mod:`anystep.kinds`): the common ``world``,
``model``, ``train``, ``optim`` (one optimizer per trained role), ``ema`` (of the trained product), ``sweep``
and ``validation`` (the sweep during training), and the kind's own (``stage1``, ``stage2``, ...). Every section's dataclass lives beside its component
and carries the official defaults; a kind may start one from other defaults (Stage 2's optimizer). An unknown
key, a section the kind does not read, or a world section of another world is an error that names it: nothing
typed is silently ignored. ``resolve(preset, ["train.steps=100", ...])`` returns a :class:`RunConfig`;
``to_yaml`` prints it back (``--dry-run``, and every checkpoint's ``config.yaml``).
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

from .errors import UsageError
from .evaluate.sweep import SweepConfig
from .kinds import Kind, kind
from .models.architectures import FAMILIES, TRANSFORMER_FAMILIES, CausalModelConfig
from .train.loop import EMAConfig, OptimConfig, TrainConfig
from .train.validation import ValidationConfig
from .worlds import WORLDS


class ConfigError(UsageError):
    """A config key or value that cannot work (named in the message)."""


@dataclass
class ModelConfig:
    """The networks. ``init`` is the run to start from (a teacher for Stage 1, a Stage-1 run for Stage 2); the
    architecture of a run with ``init`` is that run's (saved with its weights), so ``network`` is only for a
    network trained from scratch (a teacher), the world's family config (``None``: its defaults)."""

    init: str | None = None
    gate_value: float = 0.25          # g in (1 - g) E_t(t) + g E_r(r)
    deltatime_type: str = "r"         # the delta embedder sees r ('r') or t - r ('t-r')
    # how a Stage-1 student's delta embedder starts: 'copy' of the time embedder (official: interpolated
    # timestep conditioning) or 'zero' (the paper's Fig. 7 baseline, a zero-initialised r projection added
    # to the pretrained embedding; full bidirectional students only)
    delta_init: str = "copy"
    # LoRA roles on one frozen base (Wan/AnyFlow transformers only): > 0 trains peft adapters of this rank
    # (student: attention, FFN and both time MLPs; critic: attention and FFN; teacher = the bare base).
    # Official: 256 (alpha 256). 0 = full fine-tune, the toy presets' choice for a 0.3M-parameter model.
    lora_rank: int = 0
    lora_alpha: float | None = None   # None: = lora_rank
    # dtype of the frozen base weights of a LoRA run: 'bfloat16' halves their memory (official: bf16 params);
    # adapters, EMA and optimizer state stay float32. Needs train.mixed_precision=bf16.
    base_dtype: str = "float32"
    network: Any = None               # the world's network family config (models.zoo: MLPConfig, ToyWanConfig)
    causal: CausalModelConfig | None = None   # a causal (FAR) student, built in Stage 1 (None: bidirectional)

    def __post_init__(self):
        if self.base_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.base_dtype must be 'float32' or 'bfloat16', got {self.base_dtype!r}")
        if self.deltatime_type not in ("r", "t-r"):
            raise ValueError(f"model.deltatime_type must be 'r' or 't-r', got {self.deltatime_type!r}")
        if self.delta_init not in ("copy", "zero"):
            raise ValueError(f"model.delta_init must be 'copy' or 'zero', got {self.delta_init!r}")
        if self.lora_rank < 0:
            raise ValueError(f"model.lora_rank must be >= 0, got {self.lora_rank}")


class _Sections:
    """Attribute access to a config's ``sections`` (``cfg.stage1``, ``cfg.world.shapes``)."""

    def __getattr__(self, section: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if section in sections:
            return sections[section]
        raise AttributeError(f"{type(self).__name__} has no config section {section!r} (its sections: "
                             f"{list(sections)})")


DEFAULT_WORLD = "shapes"


@dataclass
class WorldConfig(_Sections):
    """``world.name`` and that world's config sections (:data:`anystep.worlds.WORLDS`), e.g. ``world.shapes``."""

    name: str = DEFAULT_WORLD
    sections: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig(_Sections):
    """A run's config: the common sections and its kind's own (``cfg.stage1``, ``cfg.stage2``, ...)."""

    kind: str
    world: WorldConfig
    model: ModelConfig
    train: TrainConfig
    optim: dict[str, OptimConfig]
    ema: EMAConfig
    sweep: SweepConfig
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> Kind:
        """The run's kind (:mod:`anystep.kinds`)."""
        return kind(self.kind)


COMMON = ("kind", "world", "model", "train", "optim", "ema", "sweep", "validation")


# --------------------------------------------------------------------------------------------------
# parsing: dict -> RunConfig, strictly
# --------------------------------------------------------------------------------------------------
def parse_run(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a nested dict (a preset with overrides, or a saved ``config.yaml``)."""
    data = dict(data or {})
    spec = kind(data.get("kind", "stage1"))
    allowed = (*COMMON, *spec.sections)
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise ConfigError(f"a {spec.name!r} run has no section {unknown[0]!r}; its sections: {list(allowed)}")
    world = _parse_world(data.get("world"))
    cfg = RunConfig(kind=spec.name, world=world, model=_parse_model(data.get("model"), world),
                    train=_build(TrainConfig, data.get("train"), "train"),
                    optim=_parse_optim(data.get("optim"), spec),
                    ema=_build(EMAConfig, _merged(spec.ema, data.get("ema"), "ema"), "ema"),
                    sweep=_build(SweepConfig, data.get("sweep"), "sweep"),
                    validation=_build(ValidationConfig, data.get("validation"), "validation"),
                    sections={name: _build(type(make()), _merged(make(), data.get(name), name), name)
                              for name, make in spec.sections.items()})
    _check_run(cfg)
    return cfg


def _parse_world(data: dict[str, Any] | None) -> WorldConfig:
    data = dict(_mapping(data, "world"))
    name = data.pop("name", DEFAULT_WORLD)
    if name not in WORLDS:
        raise ConfigError(f"world.name must be one of {list(WORLDS)}, got {name!r}")
    entry = WORLDS[name]
    unknown = [key for key in data if key not in entry.sections]
    if unknown:
        raise ConfigError(f"world.{unknown[0]} is not a section of the {name!r} world (its sections: "
                          f"{list(entry.sections)})")
    return WorldConfig(name, {s: _build(cls, data.get(s), f"world.{s}") for s, cls in entry.sections.items()})


def _parse_model(data: dict[str, Any] | None, world: WorldConfig) -> ModelConfig:
    data = dict(_mapping(data, "model"))
    network, causal = data.pop("network", None), data.pop("causal", None)
    family = FAMILIES[WORLDS[world.name].network]
    if network is not None and family is None:
        raise ConfigError(f"the {world.name!r} world's network is its model folder's: model.network cannot be set")
    model = _build(ModelConfig, data, "model")
    model.network = None if network is None else _build(family, network, "model.network")
    model.causal = None if causal is None else _build(CausalModelConfig, causal, "model.causal")
    return model


def _parse_optim(data: dict[str, Any] | None, spec: Kind) -> dict[str, OptimConfig]:
    data = _mapping(data, "optim")
    unknown = [role for role in data if role not in spec.optim]
    if unknown:
        raise ConfigError(f"optim.{unknown[0]}: a {spec.name!r} run trains {list(spec.optim)} (one optimizer each: "
                          f"optim.<role>.lr, ...)")
    return {role: _build(OptimConfig, _merged(default, data.get(role), f"optim.{role}"), f"optim.{role}")
            for role, default in spec.optim.items()}


def _check_run(cfg: RunConfig) -> None:
    """What no single section can check alone."""
    m = cfg.model
    if m.base_dtype != "float32" and cfg.train.mixed_precision != "bf16":
        raise ConfigError("model.base_dtype=bfloat16 needs train.mixed_precision=bf16 (the base's matmuls run under "
                          "bf16 autocast)")
    if m.base_dtype != "float32" and m.lora_rank == 0:
        raise ConfigError("model.base_dtype applies to the frozen base of LoRA runs (model.lora_rank > 0)")
    if m.delta_init != "copy" and (cfg.kind != "stage1" or m.lora_rank > 0 or m.causal is not None):
        raise ConfigError("model.delta_init=zero makes a new Stage-1 student: a full (model.lora_rank=0), "
                          "bidirectional one")
    if m.causal is not None and not cfg.spec.causal:
        raise ConfigError(f"model.causal is for Stage-1 and Stage-2 runs (a {cfg.kind!r} run's model is "
                          "bidirectional)")
    family = WORLDS[cfg.world.name].network
    if (m.lora_rank > 0 or m.causal is not None) and family not in TRANSFORMER_FAMILIES:
        raise ConfigError(f"model.lora_rank > 0 and model.causal need a Wan/AnyFlow transformer; the "
                          f"{cfg.world.name!r} world's {family!r} network trains fully and bidirectionally")


def _mapping(data: Any, path: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key {path!r} is a section; give it as a mapping, got {data!r}")
    return data


def _merged(default: Any, data: dict[str, Any] | None, path: str) -> dict[str, Any]:
    """The user's keys over a default instance's."""
    return {**to_dict(default), **_mapping(data, path)}


def _build(cls: type, data: dict[str, Any] | None, path: str) -> Any:
    """``from_dict`` with a component's own validation errors turned into config errors naming the section."""
    try:
        return from_dict(cls, data, path + ".")
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from err


def from_dict(cls: type, data: dict[str, Any] | None, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise a :class:`ConfigError` naming the key."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {path + unknown[0]!r}; valid keys here: {sorted(names)}")
    return cls(**{name: _convert(hints[name], value, path + name) for name, value in data.items()})


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, _mapping(value, path), path + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(args[0], value, path)
    if origin is tuple:
        return _convert_tuple(typing.get_args(tp), value, path)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return _check_scalar(tp, value, path)


def _convert_tuple(args: tuple, value: Any, path: str) -> tuple:
    value = value if isinstance(value, (list, tuple)) else [value]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, path) for v in value)
    if len(args) != len(value):
        raise ConfigError(f"config key {path!r} needs {len(args)} values, got {value!r}")
    return tuple(_convert(a, v, path) for a, v in zip(args, value))


def _check_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    wrong = {int: isinstance(value, bool) or not isinstance(value, int), bool: not isinstance(value, bool),
             str: not isinstance(value, str), float: True}
    what = {int: "an integer", bool: "true/false", str: "a string", float: "a number"}
    if wrong.get(tp):
        raise ConfigError(f"config key {path!r} needs {what[tp]}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# back to a dict / YAML
# --------------------------------------------------------------------------------------------------
def to_dict(obj: Any) -> Any:
    if isinstance(obj, RunConfig):
        out = {name: to_dict(getattr(obj, name)) for name in COMMON}
        out.update({name: to_dict(section) for name, section in obj.sections.items()})
        return out
    if isinstance(obj, WorldConfig):
        return {"name": obj.name, **{name: to_dict(s) for name, s in obj.sections.items()}}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
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
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
    else:
        res = resources.files("anystep.configs") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; presets: {', '.join(preset_names())}")
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path!r} must be a YAML mapping")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into the nested dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def resolve(preset: str | None, overrides: list[str] = ()) -> RunConfig:
    """A preset (or YAML file, or nothing: the defaults of a Stage-1 run) with dotted overrides applied."""
    data = load_preset(preset) if preset else {}
    preset_world = _world_name(data)
    for item in overrides:
        apply_override(data, item)
    try:
        return parse_run(data)
    except ConfigError as err:
        world = _world_name(data)
        if preset and world != preset_world:
            raise ConfigError(f"{err} (the preset {preset!r} is written for the {preset_world!r} world; start from a "
                              f"{world!r} preset with --config)") from None
        raise


def _world_name(data: dict[str, Any]) -> Any:
    world = data.get("world")
    return world.get("name", DEFAULT_WORLD) if isinstance(world, dict) else DEFAULT_WORLD
