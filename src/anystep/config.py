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
class WanWorldConfig:
    """The real path: a local Wan2.1 T2V diffusers folder (the base weights) and a latent cache made by
    ``anystep cache`` or ``anystep synthesize`` (VAE latents + UMT5 embeddings; the VAE and text encoder are
    never loaded for training)."""

    model: str | None = None        # local diffusers folder: Wan2.1 T2V, or a released AnyFlow folder (import)
    data: str | None = None         # latent cache folder (index.json + shards)
    max_text_len: int = 512         # prompt embeddings zero-padded to this length (Wan: 512)


@dataclass
class WorldConfig:
    name: str = "shapes"  # 'shapes' (video world), 'gmm' (exact world) or 'wan' (a real Wan2.1 model)
    gmm: GMMConfig = field(default_factory=GMMConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    text: TextConfig = field(default_factory=TextConfig)
    wan: WanWorldConfig = field(default_factory=WanWorldConfig)

    def __post_init__(self):
        if self.name not in ("shapes", "gmm", "wan"):
            raise ValueError(f"world.name must be 'shapes', 'gmm' or 'wan', got {self.name!r}")


@dataclass
class ModelConfig:
    """The network. ``init`` is a checkpoint to start from (a teacher for Stage 1); the shapes world uses a
    tiny diffusers Wan transformer, the gmm world a small MLP."""

    init: str | None = None
    gate_value: float = 0.25          # g in (1 - g) E_t(t) + g E_r(r)
    deltatime_type: str = "r"         # the delta embedder sees r ('r') or t - r ('t-r')
    # LoRA roles on one frozen base (Wan/AnyFlow transformers only): > 0 trains peft adapters of this rank
    # (student: attention, FFN and both time MLPs; critic: attention and FFN; teacher = the bare base).
    # Official: 256 (alpha 256). 0 = full fine-tune, the toy presets' choice for a 0.3M-parameter model.
    lora_rank: int = 0
    lora_alpha: float | None = None   # None: = lora_rank
    # dtype of the frozen base weights of a LoRA run: 'bfloat16' halves their memory (official: bf16 params);
    # adapters, EMA and optimizer state stay float32. Needs train.mixed_precision=bf16.
    base_dtype: str = "float32"
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


    def __post_init__(self):
        if self.base_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.base_dtype must be 'float32' or 'bfloat16', got {self.base_dtype!r}")


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


def _stage2_optim() -> OptimConfig:
    return OptimConfig(lr=2e-6, betas=(0.0, 0.999), warmup_steps=0, ema_decay=0.99, ema_warmup_steps=200)


@dataclass
class Stage2Config:
    """Stage 2: on-policy flow-map distillation (flow-map backward simulation + DMD, a critic, the co-trained
    Stage-1 loss). Defaults are the official recipe's; ``rollout="consistency"`` is the consistency
    backward-simulation baseline (Self-Forcing / rCM style) and needs a consistency-distilled student."""

    rollout: str = "flowmap"                   # 'flowmap' (AnyFlow) or 'consistency' (baseline)
    rollout_steps: tuple[int, ...] = (2, 4, 8, 16, 50)   # N drawn uniformly; k uniform in [0, N)
    rollout_grad: str = "all"                  # 'all' segments (official) or 'one' (FastVideo's port)
    dmd_batch_size: int = 2                    # rollouts per generator step (official 1.3B: 2, 14B: 1)
    real_guidance: float = 3.0                 # teacher x0: c + s (c - u), s = 3 ("CFG 4")
    dmd_shift: float = 5.0                     # shift of the DMD re-noising times
    rollout_shift: float | None = None         # shift of the rollout's N-step grid; None: dmd_shift (official:
                                               # one scheduler, shift 5, for both)
    dmd_time_range: tuple[float, float] = (0.0, 1000.0)   # clamp of the DMD times (official: none, 0..1000)
    dmd_weight: float = 1.0
    cotrain_weight: float = 1.0                # the Stage-1 loss on a real batch, in the generator step
    critic_ratio: int = 1                      # generator steps every `critic_ratio` iterations; critic every one
    critic_shift: float = 5.0                  # critic flow matching: logit-normal t, shift
    cond_dropout: float = 0.0                  # prompts of the rollout (DMD) and critic batches dropped to the
                                               # null one; official 0 (its only 10% dropout is inside the
                                               # co-trained Stage-1 loss: stage1.cond_dropout)
    teacher: str | None = None                 # teacher checkpoint; None: the student's init run's model.init;
                                               # 'exact': the world's analytic teacher (gmm)
    critic_lr: float | None = None             # None: the same as optim.lr
    optim: OptimConfig = field(default_factory=_stage2_optim)   # official: lr 2e-6, betas (0, 0.999), EMA 0.99

    def __post_init__(self):
        for name, allowed in (("rollout", ("flowmap", "consistency")), ("rollout_grad", ("all", "one"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"stage2.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.rollout_steps or min(self.rollout_steps) < 1:
            raise ValueError(f"stage2.rollout_steps must be integers >= 1, got {list(self.rollout_steps)}")
        lo, hi = self.dmd_time_range
        if not 0.0 <= lo < hi <= 1000.0:
            raise ValueError(f"stage2.dmd_time_range must satisfy 0 <= min < max <= 1000, got {self.dmd_time_range}")
        if self.dmd_batch_size < 1 or self.critic_ratio < 1:
            raise ValueError("stage2.dmd_batch_size and stage2.critic_ratio must be >= 1")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"stage2.cond_dropout must lie in [0, 1], got {self.cond_dropout}")
        for name in ("dmd_shift", "critic_shift", "rollout_shift"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"stage2.{name} must be > 0, got {value}")

    @property
    def grid_shift(self) -> float:
        """The shift of the rollout's N-step grid."""
        return self.dmd_shift if self.rollout_shift is None else self.rollout_shift


@dataclass
class ConsistencyConfig:
    """The consistency-distillation baseline (an endpoint map at r = 0, from the teacher's ODE)."""

    intervals: int = 32                        # discretisation of [0, 1000] (shifted grid)
    teacher_guidance: float = 3.0              # CFG of the teacher's ODE step (the student is fused)
    teacher: str | None = None                 # None: model.init (a teacher run); 'exact': analytic (gmm)
    cond_dropout: float = 0.1
    shift: float = 5.0


@dataclass
class CausalConfig:
    """The causal (FAR) student: chunk-by-chunk generation with compressed context (official sec. 5).
    ``enabled`` turns a Stage-1/Stage-2 run causal; the teacher and critic stay bidirectional."""

    enabled: bool = False
    chunk_partition: tuple[int, ...] = (1, 3, 3, 3, 3, 3, 3, 2)   # latent frames per chunk (official: 21)
    full_chunk_limit: int = 3                  # newest chunks at full resolution; older ones compressed
    compressed_patch_size: tuple[int, int, int] | None = None     # None: the patch with H, W doubled (1x4x4)
    long_context_ratio: float = 0.5            # Stage 1: P(K ~ U{3..num_chunks}), else K = 3 chunks
    bidirectional_prob: float = 0.1            # Stage 1: P(an extra bidirectional flow-matching loss); Stage 2: 0
    attention: str = "auto"                    # causal attention: 'auto' (flex on CUDA, dense SDPA on CPU),
                                               # 'dense' or 'flex'

    def __post_init__(self):
        if not self.chunk_partition or min(self.chunk_partition) < 1:
            raise ValueError(f"causal.chunk_partition must be positive frame counts, got {self.chunk_partition}")
        if self.full_chunk_limit < 2:
            raise ValueError(f"causal.full_chunk_limit must be >= 2, got {self.full_chunk_limit}")
        if not (0.0 <= self.long_context_ratio <= 1.0 and 0.0 <= self.bidirectional_prob <= 1.0):
            raise ValueError("causal.long_context_ratio and causal.bidirectional_prob must lie in [0, 1]")
        if self.attention not in ("auto", "dense", "flex"):
            raise ValueError(f"causal.attention must be 'auto', 'dense' or 'flex', got {self.attention!r}")


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
    device: str = "auto"               # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
    # memory levers for real models (official: bf16 mixed precision and gradient checkpointing on)
    mixed_precision: str = "fp32"      # 'fp32' (none) or 'bf16' (autocast; weights, EMA, optimizer stay fp32)
    gradient_checkpointing: bool = False   # recompute transformer blocks in backward

    def __post_init__(self):
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ValueError(f"train.mixed_precision must be 'fp32' or 'bf16', got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"train.keep_checkpoints must be >= 0 (0 keeps all), got {self.keep_checkpoints}")


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
    kind: str = "stage1"               # 'teacher', 'stage1', 'stage2' or 'consistency' (baseline)
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.model.base_dtype != "float32" and self.train.mixed_precision != "bf16":
            raise ValueError("model.base_dtype=bfloat16 needs train.mixed_precision=bf16 (the base's matmuls "
                             "run under bf16 autocast)")
        parts = self.world.shapes.chunk_partition
        if self.causal.enabled and self.world.name == "shapes" and parts and tuple(parts) != self.causal.chunk_partition:
            raise ValueError(f"world.shapes.chunk_partition {list(parts)} (the judge's chunks) must equal "
                             f"causal.chunk_partition {list(self.causal.chunk_partition)}")
        if self.causal.enabled and self.kind not in ("stage1", "stage2"):
            raise ValueError(f"causal.enabled is for Stage-1 and Stage-2 runs (the teacher stays bidirectional), "
                             f"not {self.kind!r}")
        if self.model.base_dtype != "float32" and self.model.lora_rank == 0:
            raise ValueError("model.base_dtype applies to the frozen base of LoRA runs (model.lora_rank > 0)")

    @property
    def sampler(self) -> str:
        """How this run's model samples: 'euler' (a teacher), 'flowmap' (AnyFlow), 'consistency' (baseline)."""
        if self.kind == "teacher":
            return "euler"
        if self.causal.enabled:
            return "causal"
        if self.kind == "consistency" or (self.kind == "stage2" and self.stage2.rollout == "consistency"):
            return "consistency"
        return "flowmap"

    @property
    def train_optim(self) -> OptimConfig:
        """The optimizer settings of this kind of run (Stage 2 has its own, official lr 2e-6)."""
        return self.stage2.optim if self.kind == "stage2" else self.optim


KINDS = ("teacher", "stage1", "stage2", "consistency")


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


# Sections a kind of run never reads: given by a user they are an error (never silently ignored), and they are
# left out of the run's saved config.yaml.
UNUSED_SECTIONS = {"stage2": ("optim",)}
UNUSED_SECTIONS_WHY = {"optim": "Stage 2's generator and critic optimizers are stage2.optim, official lr 2e-6 and "
                                "betas (0, 0.999); stage2.critic_lr sets the critic's lr"}


def to_yaml(cfg: RunConfig) -> str:
    data = to_dict(cfg)
    for section in UNUSED_SECTIONS.get(cfg.kind, ()):
        data.pop(section)
    return yaml.safe_dump(data, sort_keys=False)


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
    cfg = from_dict(RunConfig, data)
    unused = [section for section in UNUSED_SECTIONS.get(cfg.kind, ()) if section in data]
    if unused:
        raise ValueError(f"a {cfg.kind!r} run does not read the section {unused[0]!r} ({UNUSED_SECTIONS_WHY[unused[0]]})")
    return cfg
