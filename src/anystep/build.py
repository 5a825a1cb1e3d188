"""The assembly: a run's roles, method and trainer from its config and lineage, and trained models back from disk.

Roles come from one of two layouts behind one interface (:func:`role_layout`): :class:`FullRoles`, every role
its own network (the toy presets' full fine-tunes), or :class:`LoraRoles`, every role a peft adapter on one frozen
base (the official layout on Wan). A kind (:mod:`anystep.kinds`) lists its roles and where each one's weights
start; the layout makes them. Every trained network is described in the checkpoint's ``architecture.json``
(:mod:`anystep.models.zoo`), so :func:`load_model` rebuilds it without reading the architecture from any config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from torch import nn

from .causal import is_causal
from .config import ConfigError, RunConfig, to_dict, to_yaml
from .errors import UsageError
from .evaluate.sweep import Sampler
from .kinds import FRESH_OR_INIT, INIT_STUDENT, STUDENT_OF_TEACHER, TEACHER, Parts, RoleSpec, no_grad_frozen
from .lineage import ARCHITECTURE, Lineage, Run, open_run, resolve_lineage
from .models import zoo
from .models.architectures import CausalModelConfig
from .models.checkpointing import enable_block_checkpointing
from .models.far import causal_student_network
from .models.roles import RoleView, SharedBase, networks
from .train import sharding, tracking
from .train.checkpoint import load_module
from .train.distributed import SINGLE, Processes
from .train.loop import Trainer
from .train.validation import Validation
from .worlds import OnDevice, make_world


def resolve_device(name: str, processes: Processes = SINGLE) -> torch.device:
    """'auto' is CUDA when available, else the CPU. Under a launcher every process takes the GPU of its local
    rank (``cuda`` and ``auto``; a named ``cuda:N`` is refused there)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu or auto")
    if processes.many and device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"train.device={name!r} under torchrun: each process takes the GPU of its local rank; "
                             "use train.device=cuda or auto")
        device = torch.device("cuda", processes.local_rank)
    return device


def build_world(cfg: RunConfig):
    return make_world(cfg.world.name, cfg.world.sections)


# --------------------------------------------------------------------------------------------------
# full copies
# --------------------------------------------------------------------------------------------------
class FullRoles:
    """Every role its own network: a velocity network trained from scratch or loaded from a run, a flow-map
    student made from the teacher's, a student loaded from ``model.init``."""

    def __init__(self, cfg: RunConfig, lineage: Lineage, world: Any):
        self.cfg, self.lineage, self.world = cfg, lineage, world

    def make(self, spec: RoleSpec) -> nn.Module | Any:
        if spec.start == FRESH_OR_INIT:
            return self._velocity(self.lineage.init)
        if spec.start == STUDENT_OF_TEACHER:
            return self._student(self._velocity(self._teacher_run_or_none()))
        if spec.start == INIT_STUDENT:
            return _load(self.lineage.init, "student")
        if not spec.trained and self.lineage.exact:
            return self.world.exact_teacher()
        return self._velocity(self.lineage.teacher)

    def _teacher_run_or_none(self) -> Run | None:
        init = self.lineage.init
        if init is not None and init.kind != "teacher":
            raise UsageError(f"a full fine-tune's student is made from a teacher run; model.init={init.spec} is a "
                             f"{init.kind!r} run (continuing a student needs model.lora_rank > 0)")
        return init

    def _velocity(self, run: Run | None) -> nn.Module:
        """``run``'s teacher network (EMA weights), or a fresh one (the wan world: the model folder's)."""
        if run is not None:
            return _load(run, "teacher")
        network = self.cfg.model.network or _default_network(self.cfg)
        return zoo.velocity_network(self.world.network, network, self.world.network_inputs())

    def _student(self, velocity: nn.Module) -> nn.Module:
        m = self.cfg.model
        if m.causal is not None:
            return zoo.causal_student_from(velocity, m.causal, m.gate_value, m.deltatime_type)
        student = zoo.student_from(velocity, m.gate_value, m.deltatime_type)
        return zoo.zero_init_delta(student) if m.delta_init == "zero" else student


def _default_network(cfg: RunConfig) -> Any:
    """The world family's default network config (None for the wan world: its folder)."""
    from .worlds import WORLDS
    family = zoo.FAMILIES[WORLDS[cfg.world.name].network]
    return family() if family is not None else None


# --------------------------------------------------------------------------------------------------
# adapters on one frozen base
# --------------------------------------------------------------------------------------------------
class LoraRoles:
    """Every role a LoRA adapter on one frozen base (official on Wan: every role is LoRA on the raw model):
    student and critic adapters, the teacher the bare base or a ``teacher`` adapter (a LoRA teacher run)."""

    def __init__(self, cfg: RunConfig, lineage: Lineage, names: tuple[str, ...], dtype: torch.dtype,
                 causal: CausalModelConfig | None):
        self.cfg, self.lineage = cfg, lineage
        teacher_lora = cfg.kind == "teacher" or (lineage.teacher is not None and lineage.teacher.lora)
        m = cfg.model
        base = _base_transformer(lineage.base, dtype)
        if causal is not None:
            base = causal_student_network(base, causal, m.gate_value, m.deltatime_type)
            self.shared = SharedBase(base, rank=m.lora_rank, alpha=m.lora_alpha, roles=names,
                                     teacher_adapter=teacher_lora, teacher_trainable=cfg.kind == "teacher")
        else:
            self.shared = SharedBase.from_wan(base, gate_value=m.gate_value, deltatime_type=m.deltatime_type,
                                              rank=m.lora_rank, alpha=m.lora_alpha, roles=names,
                                              teacher_adapter=teacher_lora, teacher_trainable=cfg.kind == "teacher")
        if teacher_lora and cfg.kind != "teacher":
            _load_adapter(self.shared.role("teacher"), lineage.teacher, "teacher")
            if "critic" in names:
                self.shared.copy_adapter("teacher", "critic")   # the critic starts as the teacher (official)

    def make(self, spec: RoleSpec) -> RoleView:
        init, view = self.lineage.init, self.shared.role(spec.name)
        if spec.start == FRESH_OR_INIT and init is not None:
            _load_adapter(view, init, "teacher")
        elif spec.start in (STUDENT_OF_TEACHER, INIT_STUDENT) and init is not None and init.kind != "teacher":
            _load_adapter(view, init, "student")   # a student to continue (Stage 2, or Stage 1 on new data)
        if not spec.trained and self.lineage.exact:
            raise UsageError("the exact teacher is the gmm world's, which has no LoRA")
        return view


def _base_transformer(base: Run | str, dtype: torch.dtype):
    """The frozen base: the wan world's model folder (in ``dtype``), or a toy teacher run's network."""
    if isinstance(base, str):
        from .models.folder import load_transformer
        return load_transformer(base, dtype=dtype)
    return _load(base, "teacher").transformer


def _load_adapter(view: nn.Module, run: Run, role: str) -> None:
    """``role``'s adapter weights (EMA when saved) of LoRA run ``run`` into ``view``."""
    if not run.lora:
        raise UsageError(f"{run.spec} is a full fine-tune; a LoRA run continues from a LoRA run of the same base")
    load_module(view, run.weights(role))


def _lora_causal(cfg: RunConfig, lineage: Lineage) -> CausalModelConfig | None:
    """The FAR layout of a LoRA run's base: asked for (Stage 1), the init student's, or an imported causal
    folder's."""
    if cfg.model.causal is not None:
        return cfg.model.causal
    source = lineage.init if lineage.init is not None and lineage.init.kind != "teacher" else None
    if source is not None:
        described = source.architecture("student")
        return _far_layout(described.get("base_config")) if described.get("causal") else None
    if isinstance(lineage.base, str):
        from .models.folder import load_transformer, transformer_kind
        if transformer_kind(lineage.base) == "anyflow_far":
            return _far_layout(load_transformer(lineage.base).config)
    return None


def _far_layout(config: Any) -> CausalModelConfig:
    return CausalModelConfig(chunk_partition=tuple(config["chunk_partition"]),
                             full_chunk_limit=config["full_chunk_limit"],
                             compressed_patch_size=tuple(config["compressed_patch_size"]))


def role_layout(cfg: RunConfig, lineage: Lineage, training: bool = True) -> FullRoles | LoraRoles:
    """The roles' layout: LoRA adapters on one base when ``model.lora_rank > 0``, else full copies. A trained
    run's LoRA base is reloaded in float32 (``model.base_dtype`` applies to training)."""
    if cfg.model.lora_rank == 0:
        return FullRoles(cfg, lineage, build_world(cfg))
    names = tuple(r.name for r in cfg.spec.roles if r.name in ("student", "critic"))
    dtype = getattr(torch, cfg.model.base_dtype) if training else torch.float32
    return LoraRoles(cfg, lineage, names, dtype, _lora_causal(cfg, lineage))


# --------------------------------------------------------------------------------------------------
# a run to train
# --------------------------------------------------------------------------------------------------
def build_trainer(cfg: RunConfig, progress: bool = True, processes: Processes = SINGLE) -> Trainer:
    """The method of ``cfg``'s kind with its roles, inside a :class:`~anystep.train.loop.Trainer` (this process's
    part of a run of ``processes.world_size``)."""
    spec, lineage = cfg.spec, resolve_lineage(cfg)
    tracking.require(cfg.train.tracker)   # not installed: an error now, before anything is built
    try:
        accumulation = cfg.train.accumulation(processes.world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device, processes)
    layout = role_layout(cfg, lineage)
    roles = {r.name: layout.make(r) for r in spec.roles}
    _check_checkpoint_levers(roles, cfg.train)
    for r in spec.roles:
        _place(roles[r.name], device, cfg.train.gradient_checkpointing, cfg.train.checkpoint_fraction,
               cfg.train.checkpoint_save)
        if not r.trained:
            roles[r.name] = no_grad_frozen(roles[r.name])
    world = OnDevice(build_world(cfg), device)
    _check_chunks(roles.get("student"), world)
    method = spec.make(Parts(roles, world, cfg.train.batch_size, cfg.train.seed, cfg.sections))
    files = {"config.yaml": to_yaml(cfg), ARCHITECTURE: _architecture(method.roles, cfg)}
    fsdp = _parallel(cfg, roles, processes) == "fsdp"
    _speed_levers(roles, cfg.train, fsdp)
    if fsdp:   # after describing them: FSDP2 renames the classes
        sharding.shard_roles(roles, processes, device, bf16=cfg.train.mixed_precision == "bf16")
    return Trainer(method, steps=cfg.train.steps, out_dir=cfg.train.out_dir, optim=dict(cfg.optim),
                   ema={spec.product: cfg.ema}, seed=cfg.train.seed, log_every=cfg.train.log_every,
                   checkpoint_every=cfg.train.checkpoint_every, keep_checkpoints=cfg.train.keep_checkpoints,
                   files=files, progress=progress, mixed_precision=cfg.train.mixed_precision, processes=processes,
                   accumulation=accumulation,
                   validation=build_validation(cfg, roles, world, processes, lambda: _reference_teacher(layout, roles, device)),
                   product=spec.product, tracker=_tracker(cfg))


def build_validation(cfg: RunConfig, roles: dict[str, Any], world: Any, processes: Processes = SINGLE,
                     teacher: Callable[[], Any] | None = None):
    """The run's validation during training (None when ``validation.every`` is 0): its product sampled its
    kind's way, judged by its world's judge (on the real path: against the many-step samples of ``teacher()``,
    by default the run's ``teacher`` role)."""
    if cfg.validation.every == 0:
        return None
    spec = cfg.spec
    guidance = cfg.sweep.guidance_for(spec.product)
    sampler = Sampler(f"{spec.product} (EMA)", roles[spec.product], guidance, spec.sampler)
    teacher = teacher or (lambda: roles["teacher"])
    return Validation(cfg.validation, sampler, world, cfg.sweep, _judge_maker(cfg, teacher, world, processes),
                      cfg.train.out_dir, guidance=spec.guidance(cfg), main=processes.main)


def _judge_maker(cfg: RunConfig, teacher: Callable[[], Any], world: Any, processes: Processes):
    """How validation gets its judge: the world's own (the toy worlds) or, on the real path, a judge against
    the teacher's Euler + CFG samples at ``sweep.teacher_steps`` (``teacher()``: the run's frozen teacher, a
    teacher run's own EMA at its first validation), made once per run and kept in ``validation/teacher_reference.safetensors``.
    Every process samples the reference or every process reads it (a sharded teacher's forward passes are
    collective); rank 0 writes it."""
    if world.judge() is not None:
        return lambda ev: world.judge()
    from .evaluate.real_judge import reference_judge

    cache = Path(cfg.train.out_dir) / "validation" / "teacher_reference.safetensors"

    def make(ev):
        kept = processes.decide(cache.is_file)
        euler = Sampler("teacher Euler", teacher(), cfg.sweep.teacher_guidance, "euler")
        return reference_judge(world, euler, ev, steps=cfg.sweep.teacher_steps, shift=cfg.sweep.shift,
                               clip=cfg.sweep.clip, device=world.device, batch_size=cfg.sweep.batch_size,
                               cache=cache if kept or processes.main else None)
    return make


def _tracker(cfg: RunConfig) -> tracking.TrackerSettings:
    """The run's tracker (``train.tracker``), given the resolved config."""
    t = cfg.train
    return tracking.TrackerSettings(t.tracker, Path(t.out_dir), to_dict(cfg), t.wandb_project or "anystep",
                                    t.wandb_mode or "offline")


def _reference_teacher(layout: FullRoles | LoraRoles, roles: dict[str, Any], device: torch.device) -> Any:
    """The teacher a run's validation measures against on the real path: its ``teacher`` role (Stage 2, the
    consistency kinds; a teacher run's own), else (Stage 1) the teacher it was made from: the shared base's
    teacher view of a LoRA run (the bare base, or its teacher adapter: no memory), a copy loaded for a full one."""
    if "teacher" in roles:
        return roles["teacher"]
    if isinstance(layout, LoraRoles):
        return layout.shared.role("teacher")
    teacher = layout.make(RoleSpec("teacher", TEACHER, trained=False))
    _place(teacher, device, checkpointing=False)
    return no_grad_frozen(teacher)


FSDP_FROM = 4e9   # train.parallel=auto shards the networks from this many parameters on


def _parallel(cfg: RunConfig, roles: dict[str, Any], processes: Processes) -> str:
    """'ddp' or 'fsdp' for this run (one process: 'ddp', nothing to share); a ConfigError for what FSDP2 does
    not run here yet."""
    mode = cfg.train.parallel
    if not processes.many:
        if mode == "fsdp":
            raise ConfigError("train.parallel=fsdp shards over several processes: launch with torchrun")
        return "ddp"
    unsupported = _not_shardable(cfg, roles)
    if mode == "auto":
        big = sum(p.numel() for net in networks(roles.values()) for p in net.parameters()) >= FSDP_FROM
        return "fsdp" if big and unsupported is None else "ddp"
    if mode == "fsdp" and unsupported is not None:
        raise ConfigError(f"train.parallel=fsdp does not run {unsupported} yet: use train.parallel=ddp")
    return mode


def _not_shardable(cfg: RunConfig, roles: dict[str, Any]) -> str | None:
    """What of this run FSDP2 cannot shard here (None: all of it)."""
    if "stage1" in cfg.sections and cfg.sections["stage1"].derivative == "jvp":
        return "stage1.derivative=jvp"
    return None


def _check_chunks(student: Any, world: Any) -> None:
    """A causal student's chunk partition covers the world's clips (a UsageError naming both otherwise)."""
    if student is not None and is_causal(student) and sum(student.chunk_partition) != world.shape[0]:
        raise UsageError(f"the causal student's chunk partition {list(student.chunk_partition)} covers "
                         f"{sum(student.chunk_partition)} frames, the world's clips have {world.shape[0]} "
                         "(model.causal.chunk_partition)")


def _place(module: Any, device: torch.device, checkpointing: bool, fraction: float = 1.0,
           save: str = "none") -> None:
    """Move a role to the training device; gradient checkpointing of its transformer blocks (through the shared
    base for LoRA views, so the recomputation runs with the forward's adapter): the first ``round(fraction *
    num_blocks)``, keeping their attention outputs with ``save='attention'``
    (:mod:`anystep.models.checkpointing`)."""
    if not isinstance(module, nn.Module):
        return
    module.to(device)
    if checkpointing:
        if isinstance(module, RoleView):
            module.shared.enable_gradient_checkpointing(fraction, save)
        elif hasattr(module, "transformer"):
            enable_block_checkpointing(module.transformer, fraction, save)


# diffusers' attention backends that run one of torch's fused SDPA kernels (what checkpoint_save=attention keeps)
FUSED_SDPA_BACKENDS = ("auto", "native", "_native_flash", "_native_cudnn", "_native_efficient")


def _check_checkpoint_levers(roles: dict[str, Any], train: Any) -> None:
    """A ConfigError where ``train.checkpoint_fraction`` / ``train.checkpoint_save`` cannot act: no transformer
    blocks in the run; for ``save=attention``, a causal (FAR) model, attention that is no fused SDPA kernel,
    compiled blocks."""
    given = train.checkpoint_fraction != 1.0 or train.checkpoint_save != "none"
    if not given:
        return
    transformers = [n for n in networks(roles.values()) if isinstance(n, ModelMixin)]
    if not transformers:
        raise ConfigError("train.checkpoint_fraction / train.checkpoint_save act on the blocks of Wan-family "
                          "transformers; this run's networks have none")
    if train.checkpoint_save == "attention":
        if any(getattr(t.config, "chunk_partition", None) is not None for t in transformers):
            raise ConfigError("train.checkpoint_save=attention does not apply to a causal (FAR) model yet: its "
                              "attention (anystep's own processor, flex attention on a GPU) is not one of the "
                              "kept kernels, and its mask cache makes the recomputation differ from the forward")
        if train.attention_backend not in FUSED_SDPA_BACKENDS:
            raise ConfigError(f"train.checkpoint_save=attention keeps the outputs of torch's fused attention "
                              f"kernels; train.attention_backend={train.attention_backend!r} runs none: use one "
                              f"of {list(FUSED_SDPA_BACKENDS)}")
        if train.compile != "none":
            raise ConfigError("train.checkpoint_save=attention has not run with train.compile=blocks here: use one "
                              "of the two")


def _speed_levers(roles: dict[str, Any], train: Any, fsdp: bool) -> None:
    """``train.attention_backend`` and ``train.compile`` on every transformer of the run (numerics unchanged, to
    float tolerance); a ConfigError where a lever cannot apply (an attention backend on a causal model, whose
    causal attention is chosen by ``model.causal.attention`` / ``model.causal.flex_compile``)."""
    if train.attention_backend == "auto" and train.compile == "none":
        return
    transformers = [n for n in networks(roles.values()) if isinstance(n, ModelMixin)]
    if not transformers:
        raise ConfigError("train.attention_backend / train.compile act on Wan-family transformers; this run's "
                          "networks have none")
    if train.attention_backend != "auto" and any(_is_far(t) for t in transformers):
        raise ConfigError("train.attention_backend does not apply to a causal (FAR) model: its self-attention is "
                          "anystep's own processor (model.causal.attention, model.causal.flex_compile)")
    if fsdp and train.compile != "none":
        raise ConfigError("train.compile=blocks has not run with train.parallel=fsdp here: use one of the two")
    if train.attention_backend != "auto":
        _set_attention_backend(transformers, train.attention_backend)
    if train.compile == "blocks":   # the FAR class names its blocks too (_repeated_blocks)
        for t in transformers:
            t.compile_repeated_blocks(fullgraph=False)


def _is_far(transformer: nn.Module) -> bool:
    return getattr(transformer.config, "chunk_partition", None) is not None


def _set_attention_backend(transformers: list[nn.Module], backend: str) -> None:
    """``backend`` on these transformers' attention processors only: diffusers' ``set_attention_backend`` also
    makes it the process-wide default, which would reach every model built later in the process."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    try:
        for t in transformers:
            t.set_attention_backend(backend)
    finally:
        _AttentionBackendRegistry.set_active_backend(default)


def _architecture(roles: dict[str, nn.Module], cfg: RunConfig) -> str:
    """``architecture.json``: every trained role's network (LoRA: the adapter's layout and its base's class)."""
    described = {}
    for name, module in roles.items():
        if isinstance(module, RoleView):
            base = module.shared.base
            described[name] = {"network": "lora", "rank": cfg.model.lora_rank, "alpha": cfg.model.lora_alpha,
                               "causal": module.shared.causal, "base_class": type(base).__name__,
                               "base_config": {k: v for k, v in base.config.items() if not k.startswith("_")}}
        else:
            described[name] = zoo.describe(module)
    return json.dumps(described, indent=1, default=list) + "\n"


# --------------------------------------------------------------------------------------------------
# a trained run back
# --------------------------------------------------------------------------------------------------
def load_model(spec: str, role: str | None = None, ema: bool = True) -> tuple[nn.Module, RunConfig, str]:
    """A trained run's network (default: its product, the teacher of a teacher run, else the student; 'critic'
    for a Stage-2 critic), its EMA weights when saved, in eval mode. Returns (model, config, role)."""
    run = open_run(spec)
    return _load(run, role, ema).eval(), run.config, role or run.config.spec.product


def _load(run: Run, role: str | None = None, ema: bool = True) -> nn.Module:
    from .train.checkpoint import CheckpointError

    role = role or run.config.spec.product
    if not run.has(role):
        raise CheckpointError(f"{run.path} has no {role!r} weights (a {run.kind!r} run)")
    if run.lora:
        model = _lora_view(run, role)
    else:
        model = zoo.build(run.architecture(role))
    load_module(model, run.weights(role, ema))
    return model


def _lora_view(run: Run, role: str) -> RoleView:
    """``role``'s adapter of a LoRA run on its base, rebuilt in float32."""
    m = run.config.model
    described = run.architecture(role)
    causal = _far_layout(described["base_config"]) if described.get("causal") else None
    base = _base_transformer(_saved_base(run), torch.float32)
    if causal is not None:
        base = causal_student_network(base, causal, m.gate_value, m.deltatime_type)
    names = (role,) if role in ("student", "critic") else ()
    shared = (SharedBase(base, rank=m.lora_rank, alpha=m.lora_alpha, roles=names, teacher_adapter=role == "teacher")
              if causal is not None else
              SharedBase.from_wan(base, gate_value=m.gate_value, deltatime_type=m.deltatime_type, rank=m.lora_rank,
                                  alpha=m.lora_alpha, roles=names, teacher_adapter=role == "teacher"))
    return shared.role(role)


def _saved_base(run: Run) -> Run | str:
    """The frozen base a LoRA run adapted: its model folder (wan world) or its toy teacher run."""
    from .lineage import chain
    if run.world == "wan":
        return run.config.world.wan.model
    return next(r for r in chain(run) if r.kind == "teacher" and not r.lora)
