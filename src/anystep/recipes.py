"""Recipes: wire a world, models, a Method and the loop into a run. Components stay in their modules."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import yaml
from torch import nn

from .config import RunConfig, from_dict, to_yaml
from .flowmap import FlowMap
from .train.checkpoint import (CheckpointError, checkpoint_to_resume, clean_run_folder, clear_run_folder,
                               find_checkpoint, load_module, lock_run_folder, write_text_atomic)
from .train.loop import Trainer
from .train.methods import (CausalStage1, CausalStage2, ConsistencyDistillation, Stage1, Stage2,
                            TeacherFineTune)
from .worlds.binding import OnDevice, make_binding

SHIPPED_PREFIX = "shipped:"


def resolve_checkpoint(spec: str) -> Path:
    """A checkpoint path, run folder, or ``shipped:<name>`` (a checkpoint that ships inside the package)."""
    if spec.startswith(SHIPPED_PREFIX):
        name = spec[len(SHIPPED_PREFIX):]
        res = resources.files("anystep") / "assets" / name
        if not res.is_dir():
            raise CheckpointError(f"no shipped checkpoint named {name!r}")
        return Path(str(res))
    return find_checkpoint(spec)


def checkpoint_config(ckpt: Path) -> RunConfig:
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return from_dict(RunConfig, yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError) as err:
        raise CheckpointError(f"corrupt config in {path}: {err}") from err


def load_model(spec: str, role: str | None = None, ema: bool = True) -> tuple[nn.Module, RunConfig, str]:
    """Rebuild a trained model from its checkpoint. ``role`` defaults to the run's trained role (teacher for a
    teacher run, else the student; 'critic' for a Stage-2 critic); EMA weights are used when present.
    Returns (model, config, role)."""
    ckpt = resolve_checkpoint(spec)
    cfg = checkpoint_config(ckpt)
    binding = make_binding(cfg.world)
    role = role or ("teacher" if cfg.kind == "teacher" else "student")
    if not any((ckpt / f"{role}{sfx}.safetensors").is_file() for sfx in ("", "_ema")):
        raise CheckpointError(f"{ckpt} has no {role!r} weights (a {cfg.kind!r} run)")
    if cfg.causal.enabled and role == "student" and cfg.model.lora_rank == 0:
        net = causal_student(binding.velocity_net(cfg.model), cfg)
    elif cfg.model.lora_rank > 0:               # an adapter on the frozen base
        if role == "teacher":
            net = shared_base(cfg, roles=(), teacher_adapter=True).role("teacher")
        else:
            net = shared_base(cfg, roles=(role,)).role(role)
    else:
        net = binding.velocity_net(cfg.model)
        if role == "student":
            net = binding.student_from(net, cfg.model)
    load_module(net, weights_file(ckpt, role, ema))
    return net.eval(), cfg, role


def weights_file(ckpt: Path, role: str, ema: bool = True) -> Path:
    """A checkpoint's weights of ``role``: its EMA when asked for and saved."""
    path = ckpt / f"{role}_ema.safetensors"
    return path if ema and path.is_file() else ckpt / f"{role}.safetensors"


def far_transformer(transformer: nn.Module, cfg: RunConfig):
    """The run's causal (FAR) transformer built from a Wan / AnyFlow transformer (:mod:`anystep.models.far`)."""
    from .models.far import far_student_from_wan

    c, m = cfg.causal, cfg.model
    return far_student_from_wan(transformer, chunk_partition=c.chunk_partition, full_chunk_limit=c.full_chunk_limit,
                                compressed_patch_size=c.compressed_patch_size, gate_value=m.gate_value,
                                deltatime_type=m.deltatime_type, attention=c.attention)


def causal_student(velocity_net: nn.Module, cfg: RunConfig) -> nn.Module:
    """The causal (FAR) student of a full fine-tune, built from a Wan velocity network."""
    from .models.far_student import FARStudent

    return FARStudent(far_transformer(velocity_net.transformer, cfg), cfg.causal.chunk_partition,
                      cfg.causal.attention)


def lora_base(cfg: RunConfig, training: bool = False) -> nn.Module:
    """The frozen base transformer of a LoRA run: the model folder's (wan world, as the official recipe,
    which adds every LoRA to the raw Wan2.1 weights), else the full-weight teacher run its chain starts from.
    ``model.base_dtype`` applies to training; a trained run is reloaded (to sample or export) in float32."""
    if cfg.world.name == "gmm":
        raise ValueError("model.lora_rank > 0 needs a Wan/AnyFlow transformer; the gmm world's MLP trains fully")
    if cfg.world.name == "wan":
        from .models.folder import load_transformer
        dtype = getattr(torch, cfg.model.base_dtype) if training else torch.float32
        return load_transformer(make_binding(cfg.world).model_folder(), dtype=dtype)
    if cfg.kind == "teacher":
        raise ValueError("a LoRA teacher run needs a pretrained base: world.name=wan with world.wan.model")
    teacher, _, _ = load_model(ancestor_teacher(cfg.model.init), role="teacher")
    return teacher.transformer


def shared_base(cfg: RunConfig, roles=("student", "critic"), teacher_adapter: bool = False,
                teacher_trainable: bool = False, training: bool = False):
    """One frozen base (:func:`lora_base` as an AnyFlow transformer) with fresh LoRA adapters for ``roles``
    (:mod:`anystep.models.roles`); the teacher is the bare base, or a ``teacher`` adapter when asked."""
    from .models.roles import SharedBase

    m = cfg.model
    kwargs = dict(rank=m.lora_rank, alpha=m.lora_alpha, roles=roles, teacher_adapter=teacher_adapter,
                  teacher_trainable=teacher_trainable)
    if cfg.causal.enabled:   # a causal run's roles share a FAR base
        return SharedBase(far_transformer(lora_base(cfg, training), cfg), **kwargs)
    return SharedBase.from_wan(lora_base(cfg, training), gate_value=m.gate_value, deltatime_type=m.deltatime_type,
                               **kwargs)


def find_teacher(spec: str | None) -> str | None:
    """The nearest teacher run along the ``model.init`` chain that starts at ``spec`` (a Stage-2 run's init is
    a Stage-1 or consistency run, whose init is the teacher), or None."""
    while spec:
        cfg = checkpoint_config(resolve_checkpoint(spec))
        if cfg.kind == "teacher":
            return spec
        spec = cfg.model.init
    return None


def ancestor_teacher(spec: str) -> str:
    found = find_teacher(spec)
    if found is None:
        raise ValueError(f"no teacher run in the model.init chain of {spec}: name the teacher explicitly")
    return found


def frozen_teacher(spec: str | None, init: str, binding) -> tuple[FlowMap, str]:
    """The frozen teacher: checkpoint ``spec``, 'exact' (the world's analytic teacher), or by default the
    teacher the student's chain started from. Returns (teacher, checkpoint of the critic's init)."""
    network = spec if spec and spec != "exact" else ancestor_teacher(init)
    if spec == "exact":
        exact = binding.reference_teacher()
        if exact is None:
            raise ValueError(f"teacher 'exact' needs a world with an analytic teacher (gmm), not {binding.name!r}")
        return exact, network
    teacher, _, _ = load_model(network, role="teacher")
    return teacher.requires_grad_(False), network


def _require_init(cfg: RunConfig) -> None:
    if not cfg.model.init:
        what = "a Stage-1 run (or a consistency run)" if cfg.kind == "stage2" else "a teacher run"
        raise ValueError(f"a {cfg.kind} run starts from a trained model: set model.init to {what}")


def _load_adapter(view: nn.Module, run: str, role: str) -> None:
    """Load ``role``'s adapter weights (EMA when saved) of LoRA run ``run`` into ``view``."""
    load_module(view, weights_file(resolve_checkpoint(run), role))


def _check_same_lora(cfg: RunConfig, run: str) -> RunConfig:
    """A LoRA run that shares this run's base: same base folder (wan), rank and alpha."""
    other = checkpoint_config(resolve_checkpoint(run))
    if other.model.lora_rank > 0:
        if (other.model.lora_rank, other.model.lora_alpha) != (cfg.model.lora_rank, cfg.model.lora_alpha):
            raise ValueError(f"model.lora_rank/alpha must match {run}'s "
                             f"({other.model.lora_rank}, {other.model.lora_alpha})")
        if cfg.world.name == "wan" and other.world.wan.model != cfg.world.wan.model:
            raise ValueError(f"{run} adapts another base model ({other.world.wan.model}) than world.wan.model "
                             f"({cfg.world.wan.model})")
    return other


def _is_anyflow_folder(folder: str | None) -> bool:
    from .models.folder import transformer_class_name
    return bool(folder) and transformer_class_name(folder) == "AnyFlowTransformer3DModel"


def _lora_roles(cfg: RunConfig) -> dict[str, nn.Module]:
    """The roles of a LoRA run on one frozen base (official layout: every role is LoRA on the raw model)."""
    kind, init = cfg.kind, cfg.model.init
    init_cfg = _check_same_lora(cfg, init) if init else None
    continues = init_cfg is not None and init_cfg.model.lora_rank > 0 and init_cfg.kind == kind
    if kind == "teacher":
        shared = shared_base(cfg, roles=(), teacher_adapter=True, teacher_trainable=True, training=True)
        teacher = shared.role("teacher")
        if continues:
            _load_adapter(teacher, init, "teacher")
        return {"teacher": teacher}
    if kind == "stage1":
        if cfg.world.name != "wan":
            _require_init(cfg)   # the toy worlds' base is the teacher run named by model.init
        student = shared_base(cfg, roles=("student",), training=True).role("student")
        if init_cfg is not None and init_cfg.model.lora_rank > 0 and init_cfg.kind in ("stage1", "stage2"):
            _load_adapter(student, init, "student")   # continue a flow-map run (e.g. on new data)
        return {"student": student}
    if kind != "stage2":
        raise ValueError(f"model.lora_rank > 0 is for teacher, stage1 and stage2 runs, not {kind!r}")
    if cfg.stage2.teacher == "exact":
        raise ValueError("stage2.teacher=exact needs the gmm world, which has no LoRA")
    teacher_run = cfg.stage2.teacher or find_teacher(init)
    lora_teacher = teacher_run is not None and _check_same_lora(cfg, teacher_run).model.lora_rank > 0
    base_teacher = find_teacher(init) if cfg.world.name != "wan" else None   # the toy worlds' base
    if teacher_run and not lora_teacher and teacher_run != base_teacher:
        raise ValueError(f"teacher {teacher_run} is a full fine-tune of other weights than the base; with LoRA "
                         "roles the teacher is the base itself or a LoRA teacher run on it")
    shared = shared_base(cfg, roles=("student", "critic"), teacher_adapter=lora_teacher, training=True)
    if lora_teacher:
        _load_adapter(shared.role("teacher"), teacher_run, "teacher")
        shared.copy_adapter("teacher", "critic")      # the critic starts as the teacher (official)
    if init:
        _load_adapter(shared.role("student"), init, "student")
    elif not (cfg.world.name == "wan" and _is_anyflow_folder(cfg.world.wan.model)):
        _require_init(cfg)   # only an imported AnyFlow model is a student before any training here
    return {r: shared.role(r) for r in ("student", "critic", "teacher")}


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available here; use train.device=cpu or auto")
    return device


def _full_roles(cfg: RunConfig, binding) -> tuple[dict[str, nn.Module], FlowMap | None]:
    """The roles of a full fine-tune (every weight trains; the toy presets), and the frozen teacher."""
    kind = cfg.kind
    if kind == "stage2":
        _require_init(cfg)
        student, init_cfg, _ = load_model(cfg.model.init, role="student")
        if init_cfg.causal != cfg.causal and (init_cfg.causal.enabled or cfg.causal.enabled):
            raise ValueError(f"a causal Stage 2 starts from a causal Stage-1 run with the same causal settings: "
                             f"{cfg.model.init} has causal={init_cfg.causal}")
        if binding.name == "wan" and not cfg.stage2.teacher and find_teacher(cfg.model.init) is None:
            # no teacher fine-tune: the raw model is the teacher (as with LoRA roles, where it is the bare base)
            teacher = binding.velocity_net(cfg.model).requires_grad_(False)
            return {"student": student.train(), "critic": binding.velocity_net(cfg.model).train()}, teacher
        teacher, critic_init = frozen_teacher(cfg.stage2.teacher, cfg.model.init, binding)
        critic, _, _ = load_model(critic_init, role="teacher")   # the critic starts as the teacher network
        return {"student": student.train(), "critic": critic.train()}, teacher
    if kind == "consistency":
        _require_init(cfg)
        teacher, network = frozen_teacher(cfg.consistency.teacher, cfg.model.init, binding)
        velocity, _, _ = load_model(network, role="teacher")
        return {"student": binding.student_from(velocity, cfg.model).train()}, teacher
    if kind == "teacher":
        net = binding.velocity_net(cfg.model)
        if cfg.model.init:
            init, _, _ = load_model(cfg.model.init, role="teacher")
            net.load_state_dict(init.state_dict())
        return {"teacher": net}, None
    if cfg.model.init:
        velocity, _, _ = load_model(cfg.model.init, role="teacher")
    else:
        velocity = binding.velocity_net(cfg.model)
    if cfg.causal.enabled:
        return {"student": causal_student(velocity, cfg).train()}, None
    return {"student": binding.student_from(velocity, cfg.model).train()}, None


def _enable_checkpointing(module: nn.Module) -> None:
    """Gradient checkpointing of a role's transformer blocks (through the shared base for LoRA views)."""
    if hasattr(module, "shared"):
        module.shared.enable_gradient_checkpointing()
    elif hasattr(module, "transformer"):
        module.transformer.enable_gradient_checkpointing()


def _check_same_world(cfg: RunConfig) -> None:
    """The runs this one starts from (``model.init``, a named teacher) were trained in its world."""
    named = {"model.init": cfg.model.init, "stage2.teacher": cfg.stage2.teacher if cfg.kind == "stage2" else None,
             "consistency.teacher": cfg.consistency.teacher if cfg.kind == "consistency" else None}
    for key, spec in named.items():
        if spec and spec != "exact":
            world = checkpoint_config(resolve_checkpoint(spec)).world.name
            if world != cfg.world.name:
                raise ValueError(f"{key}={spec} is a {world!r}-world run, but this run's world is "
                                 f"{cfg.world.name!r}: start from a run of the same world")


# The network fields of ``model`` each world builds from (the wan world's network is its model folder's).
ARCHITECTURE_FIELDS = {"gmm": ("hidden", "depth", "max_freq"),
                       "shapes": ("patch", "heads", "head_dim", "layers", "ffn_dim"), "wan": ()}


def architecture(cfg: RunConfig) -> dict:
    """The world and network fields a run's weights were built with (saved in its ``config.yaml``)."""
    return {"world": cfg.world.name, **{f: getattr(cfg.model, f) for f in ARCHITECTURE_FIELDS[cfg.world.name]}}


def check_architecture(cfg: RunConfig) -> None:
    """A run that starts from ``model.init`` trains the init's network: its world and network fields must be
    the init's, or the saved config would describe another network than the weights (an error naming the
    first difference, instead of training one network and failing to reload it later)."""
    if not cfg.model.init:
        return
    theirs, ours = architecture(checkpoint_config(resolve_checkpoint(cfg.model.init))), architecture(cfg)
    for field, value in ours.items():
        if theirs[field] != value:
            raise ValueError(f"model.{field}={value!r}, but model.init={cfg.model.init} was trained with "
                             f"model.{field}={theirs[field]!r}: a run starting from model.init keeps its network, "
                             f"so set model.{field}={theirs[field]!r} (or leave model.init unset)")


def build_trainer(cfg: RunConfig, progress: bool = True) -> Trainer:
    """The Method for ``cfg.kind`` with its models, inside a :class:`Trainer`."""
    _check_same_world(cfg)
    check_architecture(cfg)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    binding = make_binding(cfg.world)
    if cfg.model.lora_rank > 0:   # every role an adapter on one frozen base
        roles = _lora_roles(cfg)
        teacher = roles.pop("teacher", None) if cfg.kind == "stage2" else None
    else:
        roles, teacher = _full_roles(cfg, binding)
    for module in [*roles.values(), teacher]:
        if isinstance(module, nn.Module):
            module.to(device)
            if cfg.train.gradient_checkpointing:
                _enable_checkpointing(module)
    if device.type != "cpu":
        binding = OnDevice(binding, device)
    n = cfg.train.batch_size
    if cfg.kind == "stage2" and cfg.causal.enabled:
        method = CausalStage2(roles["student"].train(), roles["critic"].train(), teacher, binding, n, cfg.stage2,
                              cfg.stage1, cfg.causal, seed=cfg.train.seed)
    elif cfg.kind == "stage2":
        method = Stage2(roles["student"].train(), roles["critic"].train(), teacher, binding, n, cfg.stage2,
                        cfg.stage1, seed=cfg.train.seed)
    elif cfg.kind == "consistency":
        method = ConsistencyDistillation(roles["student"], teacher, binding, n, cfg.consistency)
    elif cfg.kind == "teacher":
        method = TeacherFineTune(roles["teacher"].train(), binding, n, cfg.teacher.shift, cfg.teacher.cond_dropout)
    elif cfg.causal.enabled:
        method = CausalStage1(roles["student"].train(), binding, n, cfg.stage1, cfg.causal)
    else:
        method = Stage1(roles["student"].train(), binding, n, cfg.stage1)
    o = cfg.train_optim
    optim = dict(lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                 grad_clip=o.grad_clip, ema_decay=o.ema_decay, ema_warmup_steps=o.ema_warmup_steps)
    return Trainer(method, steps=cfg.train.steps, out_dir=cfg.train.out_dir, seed=cfg.train.seed, optim=optim,
                   log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every,
                   keep_checkpoints=cfg.train.keep_checkpoints, config_yaml=to_yaml(cfg), progress=progress,
                   mixed_precision=cfg.train.mixed_precision)


def train(cfg: RunConfig, resume: bool | str = False, progress: bool = True, *, resume_if_present: bool = False,
          overwrite: bool = False) -> Path:
    """Run (or resume) training; returns the final checkpoint folder. ``resume``: True for the run's newest
    complete checkpoint, or a checkpoint path; ``resume_if_present``: resume when the run has a complete
    checkpoint, else start fresh; ``overwrite``: start over in a folder holding a run (deleted once the model
    is built), which a fresh start refuses otherwise. The run folder is locked for the whole run and cleaned of
    what a kill left; folder problems are raised before any model is built. ``train.threads``, when set,
    becomes this process's torch thread count."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.train.out_dir)
    _check_same_world(cfg)   # before anything is written
    check_architecture(cfg)
    with lock_run_folder(out):
        clean_run_folder(out)
        start = checkpoint_to_resume(out, resume, resume_if_present, overwrite)
        trainer = build_trainer(cfg, progress)
        if overwrite:
            clear_run_folder(out)
        if start is not None:
            trainer.resume(start)
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
        last = trainer.fit()
    return last if last is not None else trainer.last_checkpoint


def export_run(spec: str, out: str | Path, *, adapters: bool = False, dtype: torch.dtype | None = None,
               overwrite: bool = False, shift: float = 5.0) -> Path:
    """Export a wan-world student (its EMA weights) as a diffusers ``AnyFlowPipeline`` folder: LoRA merged,
    or with ``adapters=True`` the base plus a LoRA file for ``pipe.load_lora_weights``."""
    from .export import export_pipeline, export_student

    ckpt = resolve_checkpoint(spec)
    cfg = checkpoint_config(ckpt)
    if cfg.world.name != "wan":
        raise ValueError(f"{spec} is a {cfg.world.name!r}-world run; export writes an AnyFlowPipeline folder (VAE, "
                         "text encoder, transformer), so it takes runs trained with world.name=wan")
    if cfg.sampler not in ("flowmap", "causal"):
        raise ValueError(f"{spec} is a {cfg.kind!r} run sampled by {cfg.sampler!r}; AnyFlowPipeline samples flow "
                         "maps (export a Stage-1 or Stage-2 run)")
    student, _, _ = load_model(spec, role="student")
    kwargs = dict(shift=shift, overwrite=overwrite, dtype=dtype)
    if cfg.model.lora_rank > 0:
        return export_student(student.shared, cfg.world.wan.model, out, as_adapter=adapters, **kwargs)
    if adapters:
        raise ValueError(f"{spec} is a full fine-tune (model.lora_rank=0): it has no adapters to keep")
    return export_pipeline(student.transformer, cfg.world.wan.model, out, **kwargs)


def teacher_transformer(spec: str, model_folder: str | None = None):
    """A teacher run's velocity model as a plain ``WanTransformer3DModel`` (LoRA merged, EMA weights), e.g.
    to synthesize training data with diffusers' ``WanPipeline``."""
    from .models.wan import wan_from_student

    teacher, cfg, _ = load_model(spec, role="teacher")
    if cfg.kind != "teacher":
        raise ValueError(f"{spec} is a {cfg.kind!r} run, not a teacher run")
    if model_folder and cfg.world.name == "wan" and Path(cfg.world.wan.model).resolve() != Path(model_folder).resolve():
        raise ValueError(f"{spec} fine-tuned {cfg.world.wan.model}, not {model_folder}")
    if cfg.model.lora_rank > 0:
        return wan_from_student(teacher.shared.merged("teacher"))
    return teacher.transformer
