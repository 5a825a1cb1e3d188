"""The generic training loop: optimizers, warm-up, clipping, EMA, NaN guard, checkpoints, progress, logs.

It knows nothing of the algorithm. A :class:`~anystep.train.method.Method` says, for each iteration, which
*phases* run: a phase names the role whose optimizer steps and returns its loss terms. The loop runs the phase
on each of this process's micro-batches (parts of the global batch, :mod:`anystep.global_batch`), sums the
terms and back-propagates each, sums the gradients over the processes (:mod:`anystep.train.distributed`),
clips, checks that the loss terms and the gradient norm are finite, steps, and updates that role's EMA; trained
weights are checked before every log and checkpoint. Only rank 0 writes.

Host syncs: a phase's statistics stay on the device (detached tensors) until its finiteness check, which
fetches them with the loss terms and the gradient norm in **one** device->host transfer: one per phase and
step (Stage 1: one; a Stage-2 generator iteration: two, the student's and the critic's, each before its own
optimizer step, which the check must precede). The fetched numbers are the ones a ``.item()`` per statistic
gave (read as float64, averaged over the micro-batches in Python), so nothing logged changes: no switch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..global_batch import parts_of
from ..models.checkpointing import check_levers
from . import sharding
from .checkpoint import (
    CheckpointError,
    fault_point,
    find_checkpoint,
    fitting_tensors,
    load_module,
    load_trainer_state,
    save_checkpoint,
    write_text_atomic,
)
from .distributed import SINGLE, Processes
from .method import Method
from .tracking import TRACKERS, WANDB_MODES, NoTracker, Tracker, TrackerSettings, open_tracker
from .validation import Validation
from .validation import summary as validation_summary


class NonFiniteLossError(RuntimeError):
    """A loss term, a gradient norm or a trained weight became NaN or infinite; training stops before the
    optimizer steps on it (weights: before they are logged or saved) and the last good checkpoint is kept."""


class EMA:
    """Exponential moving average of a module's trainable parameters (float32). The decay is 0 before
    ``warmup_steps`` (the EMA follows the weights), then constant, as in the official ShardEMA."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup_steps: int):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.params = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = self.decay if step >= self.warmup_steps else 0.0
        for n, p in module.named_parameters():
            if n in self.params:
                self.params[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def state_dict_for(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's full state dict with the EMA parameters swapped in."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for n, v in self.params.items():
            state[n] = v.to(state[n].dtype)
        return state

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Whole saved tensors (cut to this process's shards when the parameters are sharded)."""
        for n in self.params:
            self.params[n] = sharding.like(state[n].float(), self.params[n]).clone()


class MetricsLog:
    """What a run records: metrics to ``metrics.csv`` (one row per logged step, columns grow as new terms appear)
    and, with videos and checkpoint paths, to the run's tracker (:mod:`anystep.train.tracking`)."""

    def __init__(self, out_dir: Path, resume_step: int = 0, tracker: Tracker | None = None):
        self.path = Path(out_dir) / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if _whole(r) and int(r["step"]) <= resume_step]
        self.fields = ["step"] + sorted({k for r in self.rows for k in r} - {"step"})
        self._write_all()
        self.tracker = tracker if tracker is not None else NoTracker()

    def log(self, step: int, values: dict[str, float]) -> None:
        """A row for ``step``; a second call for the same step adds its values to that row (validation after
        the step's losses)."""
        new = [k for k in values if k not in self.fields]
        self.fields += sorted(new)
        if self.rows and int(self.rows[-1]["step"]) == step:
            self.rows[-1].update(values)
            self._write_all()
        elif new:
            self.rows.append({"step": step, **values})
            self._write_all()
        else:
            row = {"step": step, **values}
            self.rows.append(row)
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.fields).writerow(row)
        self.tracker.scalars(step, values)

    def video(self, step: int, tag: str, path: Path) -> None:
        """A video file written for ``step`` (e.g. ``RUN/validation/step_000400/grid.mp4``), to the tracker."""
        self.tracker.video(step, tag, Path(path))

    def picture(self, step: int, tag: str, path: Path) -> None:
        """A validation's picture to the tracker: an mp4 as a video, anything else (a PNG scatter) as an image."""
        (self.tracker.video if Path(path).suffix == ".mp4" else self.tracker.image)(step, tag, Path(path))

    def checkpoint(self, step: int, path: Path) -> None:
        self.tracker.checkpoint(step, Path(path))

    def close(self, failed: bool = False) -> None:
        self.tracker.close(failed)

    def _write_all(self) -> None:
        """The whole file again, replaced atomically (a kill never loses the rows written before)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, self.fields)
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.path, text.getvalue())


def _whole(row: dict[str, Any]) -> bool:
    """A CSV row that was written to the end (a kill can cut the last one short)."""
    return None not in row and all(v is not None for v in row.values()) and row["step"].isdigit()


def _lr_lambda(warmup: int):
    """Linear warm-up over ``warmup`` steps, then constant, as diffusers' ``get_constant_schedule_with_warmup``
    (the official schedule): the factor of update ``step`` (0-based) is ``step / warmup`` before ``warmup``,
    so the first update has lr 0."""
    return lambda step: step / warmup if step < warmup else 1.0


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then a constant learning rate, and gradient clipping; the defaults are the
    official teacher / Stage-1 values (Stage 2's: :data:`STAGE2_OPTIM`)."""

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    grad_clip: float = 1.0           # max gradient norm; 0 = no clipping
    fused: bool = False              # torch's fused AdamW kernel (one kernel for all parameters); False: foreach

    def __post_init__(self):
        if not self.lr > 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"optim needs lr > 0, warmup_steps >= 0, grad_clip >= 0 and weight_decay >= 0, got "
                             f"{self}")


@dataclass
class EMAConfig:
    """The EMA of the trained weights (float32): decay 0 before ``warmup_steps`` (it follows the weights), then
    ``decay`` (official ShardEMA: 0.999 after 1000 steps; Stage 2: 0.99 after 200)."""

    decay: float = 0.999
    warmup_steps: int = 1000

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0 or self.warmup_steps < 0:
            raise ValueError(f"ema needs 0 <= decay < 1 and warmup_steps >= 0, got {self}")


@dataclass
class TrainConfig:
    """How a run trains: its length and batch, logging and checkpoint cadence, where it writes, the device and the
    memory levers (official: bf16 mixed precision and gradient checkpointing on).

    ``batch_size`` is the global batch of every optimizer step (official: 32 for 1.3B, 16 for 14B), whatever the
    number of processes: each of W processes computes ``batch_size / W`` rows, in ``grad_accumulation``
    micro-batches (or as many as ``micro_batch_size`` rows each need)."""

    steps: int = 6000                  # optimizer updates (the official loop makes steps + 1)
    batch_size: int = 32               # the global batch
    grad_accumulation: int | None = None   # micro-batches per process and step (None: from micro_batch_size, else 1)
    micro_batch_size: int | None = None    # rows per micro-batch and process (None: from grad_accumulation)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2          # 0 keeps all
    out_dir: str = "runs/run"
    threads: int | None = None         # torch.set_num_threads; None leaves torch's default
    device: str = "auto"               # 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
    mixed_precision: str = "fp32"      # 'fp32' (none) or 'bf16' (autocast; weights, EMA, optimizer stay fp32)
    parallel: str = "auto"             # under torchrun: 'ddp' (replicas), 'fsdp' (FSDP2 shards), 'auto' (fsdp
                                       # from 4B parameters on, else ddp)
    gradient_checkpointing: bool = False   # recompute transformer blocks in backward
    checkpoint_fraction: float = 1.0   # with gradient_checkpointing: the share of each transformer's blocks
                                       # recomputed (the first round(f * num_blocks)); the others keep their
                                       # activations. 1.0: every block (official)
    checkpoint_save: str = "none"      # with gradient_checkpointing: 'attention' keeps the attention kernels'
                                       # outputs of recomputed blocks (backward recomputes the rest, not
                                       # attention); 'none': the whole block is recomputed (official)
    attention_backend: str = "auto"    # diffusers' attention dispatcher backend of Wan transformers ('native',
                                       # '_native_flash', '_native_cudnn', '_native_efficient', '_native_math',
                                       # 'flash', ...); 'auto': diffusers' default (torch SDPA, which picks one)
    compile: str = "none"              # 'blocks': torch.compile each transformer block (diffusers'
                                       # compile_repeated_blocks); 'none': eager
    tracker: str = "tensorboard"       # where rank 0 mirrors metrics, videos, checkpoint paths and the config:
                                       # 'tensorboard' (RUN/tensorboard), 'wandb' (RUN/wandb; the wandb extra),
                                       # 'none' (metrics.csv only, always written)
    wandb_project: str | None = None   # train.tracker=wandb: the project (None: 'anystep')
    wandb_mode: str | None = None      # train.tracker=wandb: 'offline' (None; `wandb sync` later) or 'online'

    def __post_init__(self):
        if self.mixed_precision not in ("fp32", "bf16"):
            raise ValueError(f"train.mixed_precision must be 'fp32' or 'bf16', got {self.mixed_precision!r}")
        if self.compile not in ("none", "blocks"):
            raise ValueError(f"train.compile must be 'none' or 'blocks', got {self.compile!r}")
        if self.attention_backend != "auto":
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = [b.value for b in AttentionBackendName]
            if self.attention_backend not in names:
                raise ValueError(f"train.attention_backend must be 'auto' or one of diffusers' {names}, got "
                                 f"{self.attention_backend!r}")
        self._check_checkpointing()
        if self.tracker not in TRACKERS:
            raise ValueError(f"train.tracker must be one of {list(TRACKERS)}, got {self.tracker!r}")
        if self.tracker != "wandb":
            given = [f"train.{k}" for k in ("wandb_project", "wandb_mode") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} apply to train.tracker=wandb, not {self.tracker!r}")
        if self.wandb_mode not in (None, *WANDB_MODES):
            raise ValueError(f"train.wandb_mode must be one of {list(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ValueError(f"train.parallel must be 'auto', 'ddp' or 'fsdp', got {self.parallel!r}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"train.keep_checkpoints must be >= 0 (0 keeps all), got {self.keep_checkpoints}")
        for name in ("grad_accumulation", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1 (or unset), got {getattr(self, name)}")

    def _check_checkpointing(self) -> None:
        try:
            check_levers(self.checkpoint_fraction, self.checkpoint_save)
        except ValueError as err:
            raise ValueError(f"train.{str(err).replace('checkpoint ', 'checkpoint_', 1)}") from None
        given = [f"train.{k}={getattr(self, k)}" for k, default in (("checkpoint_fraction", 1.0),
                                                                     ("checkpoint_save", "none"))
                 if getattr(self, k) != default]
        if given and not self.gradient_checkpointing:
            raise ValueError(f"{' and '.join(given)} shape gradient checkpointing: it needs "
                             "train.gradient_checkpointing=true")

    def accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per process and step on ``world_size`` processes; a ValueError when the global batch
        does not split evenly or the two settings disagree."""
        share, rem = divmod(self.batch_size, world_size)
        if rem:
            raise ValueError(f"train.batch_size={self.batch_size} (the global batch) does not split over "
                             f"{world_size} processes")
        count = self.grad_accumulation or 1
        if self.micro_batch_size is not None:
            count, rem = divmod(share, self.micro_batch_size)
            if rem or count == 0:
                raise ValueError(f"{share} rows per process (train.batch_size={self.batch_size} over {world_size} "
                                 f"processes) do not make whole micro-batches of train.micro_batch_size="
                                 f"{self.micro_batch_size}")
            if self.grad_accumulation not in (None, count):
                raise ValueError(f"train.grad_accumulation={self.grad_accumulation} disagrees with "
                                 f"train.micro_batch_size={self.micro_batch_size}: {share} rows per process make "
                                 f"{count} micro-batches; set one of the two")
        if share % count:
            raise ValueError(f"{share} rows per process (train.batch_size={self.batch_size} over {world_size} "
                             f"processes) do not split into train.grad_accumulation={count} equal micro-batches")
        return count


STAGE2_OPTIM = OptimConfig(lr=2e-6, betas=(0.0, 0.999), warmup_steps=0)
STAGE2_EMA = EMAConfig(decay=0.99, warmup_steps=200)


class Trainer:
    """Runs a :class:`Method` for ``steps`` iterations with checkpoints under ``out_dir/checkpoints``.

    ``optim``: an :class:`OptimConfig` for every role of the method; ``ema``: the roles whose EMA is kept;
    ``files``: text files written into every checkpoint (the run's config, the networks' descriptions);
    ``processes``: this process's place among a run's processes; ``accumulation``: micro-batches per process
    and optimizer step; ``validation``: samples and judges the EMA of role ``product`` when it is due;
    ``tracker``: the tracker rank 0 opens for each :meth:`fit` (None: metrics.csv only)."""

    def __init__(self, method: Method, *, steps: int, out_dir: str | Path, optim: dict[str, OptimConfig],
                 ema: dict[str, EMAConfig] | None = None, seed: int = 0, log_every: int = 10,
                 checkpoint_every: int = 500, keep_checkpoints: int = 2, files: dict[str, str] | None = None,
                 progress: bool = True, mixed_precision: str = "fp32", processes: Processes = SINGLE,
                 accumulation: int = 1, validation: Validation | None = None, product: str | None = None,
                 tracker: TrackerSettings | None = None):
        if set(optim) != set(method.roles):
            raise ValueError(f"optimizer settings for roles {sorted(optim)}, but the method trains {sorted(method.roles)}")
        if mixed_precision not in ("fp32", "bf16"):
            raise ValueError(f"mixed_precision must be 'fp32' or 'bf16', got {mixed_precision!r}")
        self.method, self.steps, self.out_dir, self.optim = method, steps, Path(out_dir), optim
        self.log_every, self.checkpoint_every, self.keep = log_every, checkpoint_every, keep_checkpoints
        self.files, self.progress, self.mixed_precision = dict(files or {}), progress, mixed_precision
        self.processes, self.tracker = processes, tracker
        self.validation, self.product = validation, product
        if validation is not None and product not in method.roles:
            raise ValueError(f"validation samples a trained role; {product!r} is not one of {sorted(method.roles)}")
        self.parts = parts_of(processes.rank, processes.world_size, accumulation)
        self.sharded = sharding.sharded(p for m in method.roles.values() for p in m.parameters())
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.optimizers, self.schedulers = {}, {}
        for role, module in method.roles.items():
            self.optimizers[role], self.schedulers[role] = _adamw(role, module, optim[role])
        self.emas = {role: EMA(method.roles[role], e.decay, e.warmup_steps) for role, e in (ema or {}).items()}
        self.step = 0
        self.last_checkpoint: Path | None = None   # the newest checkpoint saved or resumed from

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (sharded tensors gathered whole by every process first); every process
        returns its path once it is complete."""
        if self.processes.main or self.sharded:
            weights, state = self._snapshot()
            if self.processes.main:
                self.last_checkpoint = save_checkpoint(self.checkpoint_dir, self.step, weights, state, self.files,
                                                       self.keep)
        self.processes.barrier()
        self.last_checkpoint = Path(self.processes.broadcast(str(self.last_checkpoint)))
        return self.last_checkpoint

    def _snapshot(self) -> tuple[dict, dict]:
        """The weights (roles and EMAs) and the trainer state, whole (a collective when sharded)."""
        weights = {role: m.state_dict() for role, m in self.method.roles.items()}
        for role, ema in self.emas.items():
            weights[f"{role}_ema"] = ema.state_dict_for(self.method.roles[role])
        state = {
            "step": self.step,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "method": self.method.state_dict(),
        }
        return (sharding.full(weights), sharding.full(state)) if self.sharded else (weights, state)

    def resume(self, path: str | Path | None = None) -> int:
        """Restore everything from a checkpoint (default: this run's newest complete one), then apply this run's
        optimizer settings (lr, betas, weight decay: the saved ones are those of the run that wrote it).
        CheckpointError when it does not fit this run. Returns the step."""
        ckpt = find_checkpoint(path or self.checkpoint_dir)
        for role, module in self.method.roles.items():
            if self.sharded:
                sharding.load_whole(module, fitting_tensors(ckpt / f"{role}.safetensors", module.state_dict()))
            else:
                load_module(module, ckpt / f"{role}.safetensors")
        for role, ema in self.emas.items():
            ema.load(fitting_tensors(ckpt / f"{role}_ema.safetensors", self.method.roles[role].state_dict()))
        state = load_trainer_state(ckpt)
        try:
            for k, o in self.optimizers.items():
                saved = state["optimizers"][k]
                o.load_state_dict(sharding.shard_optimizer_state(o, saved) if self.sharded else saved)
            for k, s in self.schedulers.items():
                s.load_state_dict(state["schedulers"][k])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            self.method.load_state_dict(state["method"])
            self.step = int(state["step"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{ckpt / 'trainer.pt'} does not fit this run: {type(err).__name__} "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from err
        self._apply_hyperparameters()
        self.last_checkpoint = ckpt
        return self.step

    def _apply_hyperparameters(self) -> None:
        """This run's lr, betas and weight decay in every optimizer, the schedule continuing from its restored
        step (exactly the lr an uninterrupted run would have)."""
        for role, opt in self.optimizers.items():
            o, sched = self.optim[role], self.schedulers[role]
            sched.base_lrs = [o.lr] * len(opt.param_groups)
            for group, fn in zip(opt.param_groups, sched.lr_lambdas):
                group.update(betas=tuple(o.betas), weight_decay=o.weight_decay, initial_lr=o.lr,
                             lr=o.lr * fn(sched.last_epoch))
            sched._last_lr = [group["lr"] for group in opt.param_groups]

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for phase in self.method.phases(self.step, self.generator):
            module, opt = self.method.roles[phase.role], self.optimizers[phase.role]
            opt.zero_grad(set_to_none=True)
            terms, part_stats = self._backward(phase, module)
            params = [p for p in module.parameters() if p.requires_grad]
            if not self.sharded:   # FSDP2 has reduced them in the backward passes
                self.processes.sum_gradients(params)
            clip = self.optim[phase.role].grad_clip
            gnorm = sharding.whole(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
            gnorm, phase_stats = self._checked_fetch(phase.role, terms, gnorm, part_stats)
            opt.step()
            fault_point("mid_step", self.step + 1)
            self.schedulers[phase.role].step()
            if phase.role in self.emas:
                self.emas[phase.role].update(module, self.step)
            stats.update(phase_stats)
            stats[f"grad_norm/{phase.role}"] = gnorm
            stats[f"lr/{phase.role}"] = self.schedulers[phase.role].get_last_lr()[0]
        return stats

    def _backward(self, phase, module: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]],
                                                                 dict[str, list[float | torch.Tensor]]]:
        """Back-propagate the phase's loss on each of this process's micro-batches, each from the generator
        state the step started with (so each draws the same global batch), scaled to its share of the global
        mean. Returns every micro-batch's loss terms and statistics (numbers or device tensors, not fetched)."""
        start = self.generator.get_state()
        terms: list[tuple[str, torch.Tensor]] = []
        stats: dict[str, list[float | torch.Tensor]] = {}
        for part in self.parts:
            self.generator.set_state(start)
            with self._autocast(module):
                part_terms, part_stats = phase.run(part)
            loss = sum(part_terms.values())
            (loss if part.whole else loss / part.count).backward()
            terms += [(k, v.detach()) for k, v in part_terms.items()]
            for k, v in part_stats.items():
                stats.setdefault(k, []).append(v)
        return terms, stats

    def _checked_fetch(self, role: str, terms: list[tuple[str, torch.Tensor]], gnorm: torch.Tensor,
                       stats: dict[str, list[float | torch.Tensor]]) -> tuple[float, dict[str, float]]:
        """The gradient norm and the phase's statistics (each averaged over the micro-batches that report it),
        read with the loss terms in one device->host transfer; NonFiniteLossError naming the step, role and
        culprit when a loss term or the gradient norm is NaN or infinite (before the optimizer steps on them).
        Each value is read as float64 (exact for float32 and bf16): the numbers a ``.item()`` each would give."""
        device = gnorm.device
        tensors = [(k, i) for k, vs in stats.items() for i, v in enumerate(vs) if isinstance(v, torch.Tensor)]
        values = torch.stack([v.float().sum().double() for _, v in terms] + [gnorm.detach().float().double()]
                             + [stats[k][i].detach().double().reshape(()).to(device) for k, i in tensors]).tolist()
        checked, fetched = values[:len(terms) + 1], values[len(terms) + 1:]
        for name, value in zip([*(f"loss term {k!r}" for k, _ in terms), "the gradient norm"], checked):
            if not math.isfinite(value):
                raise NonFiniteLossError(f"step {self.step}: {name} of role {role!r} is {value}; {self._stopped()}")
        numbers = {k: list(vs) for k, vs in stats.items()}
        for (k, i), value in zip(tensors, fetched):
            numbers[k][i] = value
        return checked[-1], {k: sum(vs) / len(vs) for k, vs in numbers.items()}

    def _check_weights(self) -> None:
        """NonFiniteLossError when a trained weight of a role is NaN or infinite (one host sync per role)."""
        for role, module in self.method.roles.items():
            params = {n: sharding.local(p) for n, p in module.named_parameters() if p.requires_grad}
            finite = torch.stack([torch.isfinite(p).all() for p in params.values()]).all()
            if not self.processes.all(finite):
                bad = next((n for n, p in params.items() if not torch.isfinite(p).all()), "on another process")
                raise NonFiniteLossError(f"step {self.step}: weights of role {role!r} are not finite (e.g. {bad}) "
                                         f"after the optimizer step; {self._stopped()}")

    def _stopped(self) -> str:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
                 else "no checkpoint was written yet")
        return f"training stopped, {where}"

    def _autocast(self, module: torch.nn.Module):
        """bf16 autocast on the role's device (weights, gradients, EMA and optimizer state stay fp32)."""
        if self.mixed_precision == "fp32":
            return contextlib.nullcontext()
        device = next(iter(module.parameters())).device.type
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    def fit(self) -> Path | None:
        """Train up to ``steps``; logs every ``log_every`` steps, saves every ``checkpoint_every`` and at the end,
        each time after checking the weights; rank 0 records to ``metrics.csv`` and the tracker (closed at the
        end, marked failed when training raised). Returns the last checkpoint saved (None when none was)."""
        log = self._open_log() if self.processes.main else None
        try:
            last = self._fit(log)
        except BaseException:
            if log is not None:
                log.close(failed=True)
            raise
        if log is not None:
            log.close()
        return last

    def _open_log(self) -> MetricsLog:
        tracker = open_tracker(self.tracker, self.step) if self.tracker is not None else None
        return MetricsLog(self.out_dir, self.step, tracker)

    def _fit(self, log: MetricsLog | None) -> Path | None:
        main = self.processes.main
        bar = tqdm(total=self.steps, initial=self.step, disable=not (self.progress and main), desc="train",
                   dynamic_ncols=True)
        last = None
        t0 = time.time()
        while self.step < self.steps:
            stats = self.train_step()
            self.step += 1
            bar.update(1)
            logging = self.step % self.log_every == 0 or self.step == self.steps
            saving = self.step % self.checkpoint_every == 0 or self.step == self.steps
            if logging or saving:
                self._check_weights()
            if logging:
                stats = self.processes.mean_stats(stats)
                stats["time/sec_per_step"] = (time.time() - t0) / self.log_every
                t0 = time.time()
                if log is not None:
                    log.log(self.step, stats)
                shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in stats.items() if k.startswith("loss/")}
                bar.set_postfix(shown, refresh=False)
            if saving:
                last = self.save()
                if log is not None:
                    log.checkpoint(self.step, last)
            if self.validation is not None and self.validation.due(self.step, self.steps):
                values, picture = self._validate(bar)
                if log is not None:
                    log.log(self.step, values)
                    log.picture(self.step, "validation", picture)
        bar.close()
        return last

    def _validate(self, bar) -> tuple[dict[str, float], Path | None]:
        """Validation of the product's EMA (every process samples; rank 0 judges, writes and returns the
        scalars and the picture), then the training weights back."""
        with self.ema_weights(self.product) as module:
            device = next(iter(module.parameters())).device
            with self._autocast(module):
                values, picture = self.validation(self.step, device)
        if values:
            bar.write(f"validation at step {self.step}: "
                      f"{validation_summary(values, self.validation.judge.primary_metric, self.validation.cfg.steps)}"
                      f"; {picture}")
        return values, picture

    @contextlib.contextmanager
    def ema_weights(self, role: str):
        """``role``'s module with its EMA weights in eval mode; its own weights and mode come back after."""
        module, ema = self.method.roles[role], self.emas.get(role)
        params = dict(module.named_parameters())
        kept = {n: params[n].detach().clone() for n in (ema.params if ema else {})}
        training = module.training
        with torch.no_grad():
            for n in kept:
                params[n].copy_(ema.params[n].to(params[n].dtype))
        module.eval()
        try:
            yield module
        finally:
            module.train(training)
            with torch.no_grad():
                for n, v in kept.items():
                    params[n].copy_(v)


def _adamw(role: str, module: torch.nn.Module, o: OptimConfig):
    """AdamW over the module's trainable parameters and its warm-up schedule."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"role {role!r} has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                            fused=True if o.fused else None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(o.warmup_steps))
