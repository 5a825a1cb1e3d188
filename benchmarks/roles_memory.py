"""Memory of one Stage-2 training iteration: three model copies (official layout) vs one shared base.

    python benchmarks/roles_memory.py [--device cpu|cuda] [--hidden 768] [--layers 6] [--rank 128]

Layouts (each measured in its own fresh Python process, so that nothing freed by one inflates the other):
  copies          the official layout: student AnyFlow transformer (``zoo.student_from``), critic Wan and teacher
                  Wan, three full copies, each with its own peft LoRA on the library's targets (the teacher's
                  frozen)
  shared          anystep: one frozen AnyFlow base (``SharedBase.from_wan``: the Wan teacher at r = t) with
                  "student" and "critic" adapters; the teacher is the base with adapters disabled
  shared+teacher  the same plus a frozen "teacher" adapter (holds what "copies" holds, minus two bases)

The measured iteration is anystep's own: the stage2 kind's method (``kind("stage2").make``, official
``Stage2Config`` except no co-trained loss, ``cotrain_weight=0``) inside anystep's ``Trainer`` with the
kind's optimizers (AdamW per trained role, clipping) and the student's EMA, gradient checkpointing on (as
official); every rollout follows one fixed plan (N = 4, k = 1: 1000 -> 937.5 -> 833.3 -> 0):
  generator phase  student rollout of 3 flow-map calls with grad, a critic call and one guided teacher call
                   (cond and null prompts batched) under no_grad, the library's DMD loss, backward, AdamW step
  critic phase     a no-grad rollout of fresh prompts, a critic call with grad, flow-matching loss, backward,
                   AdamW step
Gradients are freed (set_to_none) only when the same role's next phase starts (the trainer's way). The default
config, hidden 768, 6 blocks, ffn 4480, LoRA rank 128 (Wan-1.3B: 1536, 30, 8960, rank 256: the same
LoRA-to-base ratio per block), on a 2x16x16x16 latent (128 tokens), keeps activations small next to the
weights, as checkpointing does at full scale. The inputs are random latents and text embeddings.

Reported per layout:
  params        bytes of all distinct parameters (base + adapters)
  train+adam    bytes of the trainable parameters' gradients, their AdamW states and the student's EMA (the same
                in every layout)
  resident      CPU: RSS after building the models and the trainer minus the baseline RSS; CUDA: memory_allocated
  peak          CPU: peak RSS during the iterations (VmHWM, reset after building via /proc/self/clear_refs)
                minus the baseline RSS; CUDA: torch.cuda.max_memory_allocated over the iterations
  ru_maxrss     CPU only: getrusage peak of the whole process (construction included) minus the same at
                the baseline
--dtype bfloat16 casts the frozen weights to bf16 and trains under bf16 autocast (the library's
``model.base_dtype=bfloat16`` + ``train.mixed_precision=bf16``); the adapters, their AdamW states and the EMA
stay float32, as the library keeps them.
The baseline is taken after the imports and a warm-up iteration of the same layout on a tiny model (which maps
the libraries' code). glibc's malloc keeps freed memory in its heaps, which makes RSS depend on the allocation
history; the child processes run with MALLOC_MMAP_THRESHOLD_=65536, so tensors are mmapped and returned to the
OS when freed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys

import torch
from _common import make_method, pin_plan, random_world, step_times, trainer_for, with_section
from peft import LoraConfig
from torch import nn

from anystep.backward_simulation import RolloutPlan
from anystep.models import zoo
from anystep.models.architectures import ToyWanConfig
from anystep.models.roles import STUDENT_TARGETS, VELOCITY_TARGETS, SharedBase, lora_targets

LAYOUTS = ("copies", "shared", "shared+teacher")
PLAN = RolloutPlan(4, 1)     # 1000 -> 937.5 -> 833.3 -> 0: three flow-map calls


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# --------------------------------------------------------------------------------------------------
# the roles, in each layout
# --------------------------------------------------------------------------------------------------
def _velocity(args) -> nn.Module:
    """The Wan-shaped velocity network (the zoo's ``toy_wan`` family at the asked size), frozen."""
    cfg = ToyWanConfig(patch=(1, 2, 2), heads=args.hidden // args.head_dim, head_dim=args.head_dim,
                       layers=args.layers, ffn_dim=args.ffn_dim)
    net = zoo.velocity_network("toy_wan", cfg, {"in_channels": args.channels, "text_dim": args.text_dim})
    return net.requires_grad_(False)


def _with_lora(role: nn.Module, targets, name: str, trainable: bool, rank: int) -> nn.Module:
    """A full role network with its own peft LoRA (r = alpha = rank) on the library's target linears."""
    transformer = role.transformer
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                       target_modules=lora_targets(transformer, targets)), adapter_name=name)
    for n, p in role.named_parameters():
        p.requires_grad_(trainable and ".lora_" in n)
    return role


def _copies(args) -> dict[str, nn.Module]:
    """The official layout: the zoo's student (an AnyFlow copy of the Wan weights), a critic copy and the
    teacher, each a full network with its own LoRA (the teacher's frozen); checkpointing on the trained ones."""
    velocity = _velocity(args)
    roles = {"critic": _with_lora(copy.deepcopy(velocity), VELOCITY_TARGETS, "critic", True, args.rank),
             "student": _with_lora(zoo.student_from(velocity), STUDENT_TARGETS, "student", True, args.rank),
             "teacher": _with_lora(velocity, VELOCITY_TARGETS, "teacher", False, args.rank)}
    for name in ("student", "critic"):
        roles[name].transformer.enable_gradient_checkpointing()
    return roles


def _shared(layout: str, args) -> dict[str, nn.Module]:
    """anystep's layout: one frozen base (``SharedBase.from_wan``) with student and critic adapters (and a
    frozen teacher adapter for "shared+teacher"); checkpointing through the shared base."""
    shared = SharedBase.from_wan(_velocity(args).transformer, rank=args.rank,
                                 teacher_adapter=layout == "shared+teacher")
    shared.enable_gradient_checkpointing()
    return {n: shared.role(n) for n in ("student", "critic", "teacher")}


def _build(layout: str, args) -> dict[str, nn.Module]:
    """The three roles, built on the CPU in float32 (non-persistent buffers included), then moved and the frozen
    weights cast to ``--dtype``; adapters stay float32, as the library keeps them."""
    roles = _copies(args) if layout == "copies" else _shared(layout, args)
    for m in roles.values():
        m.to(args.device, getattr(torch, args.dtype))
        for name, p in (m.shared.base if hasattr(m, "shared") else m).named_parameters():
            if ".lora_" in name:
                p.data = p.data.float()
    gc.collect()
    return roles


def _method(roles: dict[str, nn.Module], args):
    """The stage2 kind's method on these roles, no co-trained loss, every rollout on :data:`PLAN`."""
    world = random_world((args.frames, args.channels, args.size, args.size), args.text_len, args.text_dim,
                         torch.device(args.device))
    section = with_section("stage2", "stage2", rollout_steps=(PLAN.n,), dmd_batch_size=args.batch,
                           cotrain_weight=0.0)
    return pin_plan(make_method("stage2", roles, world, args.batch, stage2=section), PLAN)


# --------------------------------------------------------------------------------------------------
# measuring, in a child process per layout
# --------------------------------------------------------------------------------------------------
def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _param_bytes(roles: dict[str, nn.Module]) -> int:
    """Bytes of all distinct parameters (a view's: its whole shared base)."""
    distinct = {id(p): p for m in roles.values() for p in (m.shared if hasattr(m, "shared") else m).parameters()}
    return _bytes(distinct.values())


def _train_state_bytes(trainer) -> int:
    """Gradients of the trained parameters, their AdamW states and the student's EMA."""
    params = [p for m in trainer.method.roles.values() for p in m.parameters() if p.requires_grad]
    adam = [v for o in trainer.optimizers.values() for s in o.state.values() for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0]
    ema = [v for e in trainer.emas.values() for v in e.params.values()]
    return _bytes([p.grad for p in params if p.grad is not None]) + _bytes(adam) + _bytes(ema)


def _warm_up(layout: str, args) -> None:
    """One iteration of the same layout and method on a tiny model, so that the baseline RSS already holds the
    libraries and code pages (diffusers imports lazily; torch maps kernels on first use)."""
    tiny = argparse.Namespace(**{**vars(args), "hidden": 16, "head_dim": 8, "layers": 1, "ffn_dim": 16,
                                 "rank": 2, "text_dim": 32, "text_len": 2, "frames": 1, "size": 4, "batch": 1})
    with trainer_for(_method(_build(layout, tiny), tiny), "stage2", _precision(args)) as trainer:
        trainer.train_step()
    gc.collect()


def _precision(args) -> str:
    return "bf16" if args.dtype == "bfloat16" else "fp32"


def _reset_peak(cuda: bool, rss0: int) -> int:
    """What is resident now (above the baseline), then start the peak over."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
        f.write("5")
    return (_rss_kib() - rss0) * 1024


def _peaks(cuda: bool, rss0: int, ru0: int) -> tuple[int, int | None]:
    if cuda:
        return torch.cuda.max_memory_allocated(), None
    return (_rss_kib("VmHWM") - rss0) * 1024, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru0) * 1024


def child(layout: str, args) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cuda = args.device == "cuda"
    _warm_up(layout, args)
    rss0, ru0 = _rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    roles = _build(layout, args)
    with trainer_for(_method(roles, args), "stage2", _precision(args)) as trainer:
        resident = _reset_peak(cuda, rss0)
        times = step_times(trainer, args.iters, sync=torch.cuda.synchronize if cuda else lambda: None)
        peak, ru = _peaks(cuda, rss0, ru0)
        trainable = sum(p.numel() for m in trainer.method.roles.values() for p in m.parameters() if p.requires_grad)
        return {"layout": layout, "params": _param_bytes(roles), "trainable": trainable,
                "train_state": _train_state_bytes(trainer), "resident": resident, "peak": peak, "ru_maxrss": ru,
                "sec_per_iter": sum(times) / args.iters}


# --------------------------------------------------------------------------------------------------
# the parent: one child per layout, then the table
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    for flag, default in (("--hidden", 768), ("--head-dim", 64), ("--layers", 6), ("--ffn-dim", 4480),
                          ("--text-dim", 4096), ("--text-len", 32), ("--rank", 128), ("--channels", 16),
                          ("--frames", 2), ("--size", 16), ("--batch", 1), ("--iters", 2), ("--threads", 1)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run_layouts(args) -> list[dict]:
    """Each layout in a fresh process (tensors mmapped, so that what is freed goes back to the OS)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    results = []
    for layout in args.layouts.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args.argv, "--child", layout],
                              env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"layout {layout} failed:\n{proc.stdout}\n{proc.stderr}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def print_results(args, results: list[dict]) -> None:
    mib = 2 ** 20
    print(f"Stage-2 iteration, {args.device} {args.dtype}: hidden {args.hidden}, {args.layers} blocks, ffn "
          f"{args.ffn_dim}, LoRA rank {args.rank}, latent {args.batch}x{args.frames}x{args.channels}x"
          f"{args.size}x{args.size}, {args.iters} iterations, {args.threads} thread(s)")
    print(f"{'layout':<16}{'params':>10}{'train+adam':>12}{'resident':>10}{'peak':>10}{'ru_maxrss':>11}"
          f"{'s/iter':>8}   (MiB)")
    for r in results:
        ru = f"{r['ru_maxrss'] / mib:>11.0f}" if r["ru_maxrss"] is not None else f"{'-':>11}"
        print(f"{r['layout']:<16}{r['params'] / mib:>10.0f}{r['train_state'] / mib:>12.0f}"
              f"{r['resident'] / mib:>10.0f}{r['peak'] / mib:>10.0f}{ru}{r['sec_per_iter']:>8.1f}")
    first = results[0]
    for r in results[1:]:
        print(f"peak {first['layout']} / {r['layout']} = {first['peak'] / r['peak']:.2f}x, "
              f"params {first['params'] / r['params']:.2f}x")


def main(argv: list[str] | None = None) -> list[dict] | None:
    """Run the benchmark (each layout in a child process); prints the table and returns each layout's result."""
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return None
    results = run_layouts(args)
    print_results(args, results)
    return results


if __name__ == "__main__":
    main()
