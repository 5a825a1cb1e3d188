"""Memory of one Stage-2 training iteration: three model copies (official layout) vs one shared base.

    python benchmarks/roles_memory.py [--device cpu|cuda] [--hidden 768] [--layers 6] [--rank 128]

Layouts (each measured in its own fresh Python process, so that nothing freed by one inflates the other):
  copies          the official layout: student AnyFlow transformer, critic Wan and teacher Wan, three full
                  copies, each with its own LoRA (the teacher's frozen)
  shared          anystep: one frozen AnyFlow base (= the Wan teacher at r = t) with "student" and "critic"
                  adapters; the teacher is the base with adapters disabled
  shared+teacher  the same plus a frozen "teacher" adapter (holds what "copies" holds, minus two bases)

The measured iteration, as the official trainer runs it (gradient checkpointing on, as official):
  generator phase  student rollout of 3 flow-map calls with grad (1000 -> 937.5 -> 833.3 -> 0), a critic
                   call and two teacher calls (cond, uncond) under no_grad, DMD loss, backward, AdamW step
  critic phase     a critic call with grad on the detached rollout, flow-matching loss, backward, AdamW step
Both roles' AdamW steps run; gradients are freed (set_to_none) only when the same role's next phase starts,
as in anystep's trainer. The default config, hidden 768, 6 blocks, ffn 4480, LoRA rank 128 (Wan-1.3B: 1536,
30, 8960, rank 256: the same LoRA-to-base ratio per block), on a 2x16x16x16 latent (128 tokens), keeps
activations small next to the weights, as checkpointing does at full scale.

Reported per layout:
  params        bytes of all distinct parameters (base + adapters)
  train+adam    bytes of the trainable parameters' gradients and AdamW states (the same in every layout)
  resident      CPU: RSS after building the models minus the baseline RSS; CUDA: memory_allocated
  peak          CPU: peak RSS during the iterations (VmHWM, reset after building via /proc/self/clear_refs)
                minus the baseline RSS; CUDA: torch.cuda.max_memory_allocated over the iterations
  ru_maxrss     CPU only: getrusage peak of the whole process (construction included) minus the same at
                the baseline
--dtype bfloat16 casts every weight (LoRA included, so the AdamW states too).
The baseline is taken after the imports and a warm-up step on a tiny model (which maps the libraries' code).
glibc's malloc keeps freed memory in its heaps, which makes RSS depend on the allocation history; the child
processes run with MALLOC_MMAP_THRESHOLD_=65536, so tensors are mmapped and returned to the OS when freed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import resource
import subprocess
import sys
import time

LAYOUTS = ("copies", "shared", "shared+teacher")


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(layout: str, args, torch):
    """The three role models (student, critic, teacher) and the trainable parameter lists."""
    from peft import LoraConfig

    from anystep.models.roles import STUDENT_TARGETS, VELOCITY_TARGETS, SharedBase, lora_targets
    from anystep.models.wan import AnyFlowStudent, WanVelocity, student_from_wan, tiny_wan

    heads = args.hidden // args.head_dim
    wan = tiny_wan(in_channels=args.channels, text_dim=args.text_dim, heads=heads, head_dim=args.head_dim,
                   layers=args.layers, ffn_dim=args.ffn_dim, patch=(1, 2, 2))
    wan.requires_grad_(False)
    if layout == "copies":
        def lora(model, targets, name, trainable):
            cfg = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                             target_modules=lora_targets(model, targets))
            model.add_adapter(cfg, adapter_name=name)
            for n, p in model.named_parameters():
                p.requires_grad_(trainable and ".lora_" in n)
            return model

        critic_wan = copy.deepcopy(wan)
        student = AnyFlowStudent(lora(student_from_wan(wan), STUDENT_TARGETS, "student", True))
        critic = WanVelocity(lora(critic_wan, VELOCITY_TARGETS, "critic", True))
        teacher = WanVelocity(lora(wan, VELOCITY_TARGETS, "teacher", False))
        for m in (student, critic):
            m.transformer.enable_gradient_checkpointing()
        models = (student, critic, teacher)
    else:
        shared = SharedBase(student_from_wan(wan), rank=args.rank, teacher_adapter=layout == "shared+teacher")
        del wan
        shared.enable_gradient_checkpointing()
        models = tuple(shared.role(n) for n in ("student", "critic", "teacher"))
    for m in models:   # built on the CPU in float32 (non-persistent buffers included), then moved and cast
        m.to(args.device, getattr(torch, args.dtype))
    gc.collect()
    return models


def _param_bytes(modules, torch):
    seen, total = set(), 0
    for m in modules:
        base = m.shared if hasattr(m, "shared") else m
        for p in base.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def _warm_up(torch) -> None:
    """Import everything and run the kernels once on a tiny model, so that the baseline RSS already holds
    the libraries and code pages (diffusers imports lazily; torch maps kernels on first use)."""
    import peft  # noqa: F401

    from anystep.models.roles import SharedBase
    from anystep.models.wan import tiny_wan

    shared = SharedBase.from_wan(tiny_wan(heads=2, head_dim=8, layers=1, ffn_dim=16), rank=2)
    shared.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(shared.role("student").parameters())
    x, t, text = torch.randn(1, 2, 3, 4, 4), torch.full((1,), 500.0), torch.randn(1, 2, 32)
    shared.role("student")(x, t, t, text).sum().backward()
    opt.step()
    with torch.no_grad():
        shared.role("critic")(x, t, t, text)
    del shared, opt
    gc.collect()


def child(layout: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cuda = args.device == "cuda"
    _warm_up(torch)
    rss0, ru0 = _rss_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    student, critic, teacher = _build(layout, args, torch)
    params = {role: [p for p in m.parameters() if p.requires_grad] for role, m in
              (("student", student), ("critic", critic))}
    opts = {role: torch.optim.AdamW(ps, lr=1e-6, betas=(0.0, 0.999)) for role, ps in params.items()}
    dev, dtype = args.device, getattr(torch, args.dtype)
    g = torch.Generator(dev).manual_seed(0)
    shape = (args.batch, args.frames, args.channels, args.size, args.size)
    text = torch.randn(args.batch, args.text_len, args.text_dim, generator=g, device=dev, dtype=dtype)
    null = torch.zeros_like(text)
    times = [1000.0, 937.5, 833.3, 0.0]

    def full(v):
        return torch.full((args.batch,), v, device=dev)   # float32 times

    def rollout():
        x = torch.randn(shape, generator=g, device=dev, dtype=dtype)
        for t, r in itertools.pairwise(times):
            x = x - (t - r) / 1000 * student(x, full(t), full(r), text)
        return x

    def iteration():
        opts["student"].zero_grad(set_to_none=True)
        x = rollout()                                                   # with grad
        tau, n = full(500.0), torch.randn(shape, generator=g, device=dev, dtype=dtype)
        z = 0.5 * x.detach() + 0.5 * n
        with torch.no_grad():
            x_fake = z - 0.5 * critic(z, tau, tau, text)
            x_c = z - 0.5 * teacher(z, tau, tau, text)
            x_u = z - 0.5 * teacher(z, tau, tau, null)
            x_real = x_c + 3.0 * (x_c - x_u)
            grad = (x_fake - x_real) / (x - x_real).abs().mean().clamp_min(1e-6)
        (0.5 * (x - (x - grad).detach()).square().mean()).backward()
        opts["student"].step()
        opts["critic"].zero_grad(set_to_none=True)
        x0 = x.detach()
        n = torch.randn(shape, generator=g, device=dev, dtype=dtype)
        (critic(0.5 * x0 + 0.5 * n, tau, tau, text) - (n - x0)).square().mean().backward()
        opts["critic"].step()

    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        resident = (_rss_kib() - rss0) * 1024
        with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
            f.write("5")
    start = time.perf_counter()
    for _ in range(args.iters):
        iteration()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        ru = None
    else:
        peak = (_rss_kib("VmHWM") - rss0) * 1024
        ru = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ru0) * 1024
    train_state = sum(p.grad.numel() * p.grad.element_size() for ps in params.values() for p in ps
                      if p.grad is not None)
    train_state += sum(v.numel() * v.element_size() for o in opts.values() for s in o.state.values()
                       for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"layout": layout, "params": _param_bytes((student, critic, teacher), torch),
            "trainable": sum(p.numel() for ps in params.values() for p in ps), "train_state": train_state,
            "resident": resident, "peak": peak, "ru_maxrss": ru,
            "sec_per_iter": (time.perf_counter() - start) / args.iters}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--ffn-dim", type=int, default=4480)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = sys.argv[1:]
    results = []
    for layout in args.layouts.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", layout],
                              env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"layout {layout} failed:\n{proc.stdout}\n{proc.stderr}")
        results.append(json.loads(lines[-1][len("RESULT "):]))

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


if __name__ == "__main__":
    main()
