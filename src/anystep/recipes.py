"""Recipes: wire a world, models, a Method and the loop into a run. Components stay in their modules."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import yaml
from torch import nn

from .config import RunConfig, from_dict, to_yaml
from .flowmap import FlowMap
from .train.checkpoint import CheckpointError, find_checkpoint, load_module
from .train.loop import Trainer
from .train.methods import ConsistencyDistillation, Stage1, Stage2, TeacherFineTune
from .worlds.binding import make_binding

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
    if cfg.model.lora_rank > 0 and role != "teacher":
        net = shared_base(cfg).role(role)        # the adapter on the frozen teacher base
    else:
        net = binding.velocity_net(cfg.model)
        if role == "student":
            net = binding.student_from(net, cfg.model)
    name = f"{role}_ema" if ema and (ckpt / f"{role}_ema.safetensors").is_file() else role
    load_module(net, ckpt / f"{name}.safetensors")
    return net.eval(), cfg, role


def shared_base(cfg: RunConfig):
    """One frozen base (the AnyFlow transformer built from the run's teacher) with fresh student and critic
    LoRA adapters (:mod:`anystep.models.roles`); the teacher is the bare base."""
    from .models.roles import SharedBase

    if cfg.world.name == "gmm":
        raise ValueError("model.lora_rank > 0 needs a Wan/AnyFlow transformer; the gmm world's MLP trains fully")
    teacher, _, _ = load_model(ancestor_teacher(cfg.model.init), role="teacher")
    m = cfg.model
    return SharedBase.from_wan(teacher.transformer, gate_value=m.gate_value, rank=m.lora_rank, alpha=m.lora_alpha)


def ancestor_teacher(spec: str) -> str:
    """The nearest teacher run along the ``model.init`` chain that starts at ``spec`` (a Stage-2 run's init is
    a Stage-1 or consistency run, whose init is the teacher)."""
    start = spec
    while spec:
        cfg = checkpoint_config(resolve_checkpoint(spec))
        if cfg.kind == "teacher":
            return spec
        spec = cfg.model.init
    raise ValueError(f"no teacher run in the model.init chain of {start}: name the teacher explicitly")


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


def build_trainer(cfg: RunConfig, progress: bool = True) -> Trainer:
    """The Method for ``cfg.kind`` with its models, inside a :class:`Trainer`."""
    torch.manual_seed(cfg.train.seed)
    binding = make_binding(cfg.world)
    if cfg.kind == "stage2":
        _require_init(cfg)
        if cfg.model.lora_rank > 0:   # student, critic and teacher share one frozen base
            if cfg.stage2.teacher is not None:
                raise ValueError("with LoRA roles the teacher is the shared base: leave stage2.teacher unset")
            init_cfg = checkpoint_config(resolve_checkpoint(cfg.model.init))
            if (init_cfg.model.lora_rank, init_cfg.model.lora_alpha) != (cfg.model.lora_rank, cfg.model.lora_alpha):
                raise ValueError(f"model.lora_rank/alpha must match the Stage-1 run's "
                                 f"({init_cfg.model.lora_rank}, {init_cfg.model.lora_alpha})")
            shared = shared_base(cfg)
            student, critic, teacher = (shared.role(n) for n in ("student", "critic", "teacher"))
            init = resolve_checkpoint(cfg.model.init)
            name = "student_ema" if (init / "student_ema.safetensors").is_file() else "student"
            load_module(student, init / f"{name}.safetensors")
        else:
            teacher, critic_init = frozen_teacher(cfg.stage2.teacher, cfg.model.init, binding)
            student, _, _ = load_model(cfg.model.init, role="student")
            critic, _, _ = load_model(critic_init, role="teacher")   # the critic starts as the teacher network
        method = Stage2(student.train(), critic.train(), teacher, binding, cfg.train.batch_size, cfg.stage2,
                        cfg.stage1, seed=cfg.train.seed)
    elif cfg.kind == "consistency":
        _require_init(cfg)
        teacher, network = frozen_teacher(cfg.consistency.teacher, cfg.model.init, binding)
        velocity, _, _ = load_model(network, role="teacher")
        student = binding.student_from(velocity, cfg.model).train()
        method = ConsistencyDistillation(student, teacher, binding, cfg.train.batch_size, cfg.consistency)
    elif cfg.kind == "teacher":
        net = binding.velocity_net(cfg.model)
        if cfg.model.init:
            init, _, _ = load_model(cfg.model.init, role="teacher")
            net.load_state_dict(init.state_dict())
        method = TeacherFineTune(net, binding, cfg.train.batch_size, cfg.teacher.shift, cfg.teacher.cond_dropout)
    else:
        if cfg.model.lora_rank > 0:
            _require_init(cfg)
            student = shared_base(cfg).role("student").train()
        else:
            if cfg.model.init:
                velocity, _, _ = load_model(cfg.model.init, role="teacher")
            else:
                velocity = binding.velocity_net(cfg.model)
            student = binding.student_from(velocity, cfg.model).train()
        method = Stage1(student, binding, cfg.train.batch_size, cfg.stage1)
    o = cfg.train_optim
    optim = dict(lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps,
                 grad_clip=o.grad_clip, ema_decay=o.ema_decay, ema_warmup_steps=o.ema_warmup_steps)
    return Trainer(method, steps=cfg.train.steps, out_dir=cfg.train.out_dir, seed=cfg.train.seed, optim=optim,
                   log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every,
                   keep_checkpoints=cfg.train.keep_checkpoints, config_yaml=to_yaml(cfg), progress=progress)


def train(cfg: RunConfig, resume: bool | str = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the final checkpoint folder."""
    trainer = build_trainer(cfg, progress)
    if resume:
        trainer.resume(None if resume is True else resume)
    Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.train.out_dir) / "config.yaml").write_text(to_yaml(cfg))
    last = trainer.fit()
    return last if last is not None else find_checkpoint(trainer.checkpoint_dir)
