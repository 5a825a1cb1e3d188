"""Recipes: wire a world, models, a Method and the loop into a run. Components stay in their modules."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import yaml
from torch import nn

from .config import RunConfig, from_dict, to_yaml
from .train.checkpoint import CheckpointError, find_checkpoint, load_module
from .train.loop import Trainer
from .train.methods import Stage1, TeacherFineTune
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
    teacher run, student for Stage 1); EMA weights are used when present. Returns (model, config, role)."""
    ckpt = resolve_checkpoint(spec)
    cfg = checkpoint_config(ckpt)
    binding = make_binding(cfg.world)
    role = role or ("teacher" if cfg.kind == "teacher" else "student")
    net = binding.velocity_net(cfg.model)
    if role == "student":
        net = binding.student_from(net, cfg.model)
    name = f"{role}_ema" if ema and (ckpt / f"{role}_ema.safetensors").is_file() else role
    load_module(net, ckpt / f"{name}.safetensors")
    return net.eval(), cfg, role


def build_trainer(cfg: RunConfig, progress: bool = True) -> Trainer:
    """The Method for ``cfg.kind`` with its models, inside a :class:`Trainer`."""
    torch.manual_seed(cfg.train.seed)
    binding = make_binding(cfg.world)
    if cfg.kind == "teacher":
        net = binding.velocity_net(cfg.model)
        if cfg.model.init:
            init, _, _ = load_model(cfg.model.init, role="teacher")
            net.load_state_dict(init.state_dict())
        method = TeacherFineTune(net, binding, cfg.train.batch_size, cfg.teacher.shift, cfg.teacher.cond_dropout)
    else:
        if cfg.model.init:
            velocity, _, _ = load_model(cfg.model.init, role="teacher")
        else:
            velocity = binding.velocity_net(cfg.model)
        student = binding.student_from(velocity, cfg.model).train()
        method = Stage1(student, binding, cfg.train.batch_size, cfg.stage1)
    o = cfg.optim
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
