"""Cost of a Stage-1 step over a plain flow-matching step, on the shapes student, measured in one run.

    python benchmarks/stage1_cost.py [--batch 32] [--iters 6] [--threads 2]

Rows (each a full training step: forward(s), backward, AdamW):
  flow matching                   1 forward with grad
  stage 1, official layout        fused guidance + central difference as the official code runs them:
                                  3 separate no-grad forwards (null branch, t+eps, t-eps) for every sample
  stage 1, anystep (batched)      the same loss; one no-grad call holding the null branch and the
                                  difference points of the non-diffusion samples only
  stage 1, exact JVP              fused guidance + torch.func.jvp (math attention on CPU)
The paper reports 1.73x for fusion + difference over flow matching (Wan-1.3B, GPUs).
Run it alone: other processes on a 2-core machine distort CPU timings badly.
"""

from __future__ import annotations

import argparse
import time

import torch
from _shapes import shapes_setup

from anystep.objectives.flow_matching import flow_matching_step, noisy
from anystep.objectives.flowmap import Stage1Config, Stage1Objective, fuse_guidance, meanflow_target
from anystep.time import beta08_weight, sample_time_pairs


def official_layout_loss(model, x0, cond, null, generator, w=3.0, eps_fd=5.0):
    """The official step's call pattern (no batching, difference for every sample), same formulas."""
    b = x0.shape[0]
    p = sample_time_pairs(b, generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    v = eps - x0
    x_t = noisy(x0, eps, p.t)
    u_c = model(x_t, p.t, p.r, cond)
    with torch.no_grad():
        u_u = model(x_t, p.t, p.r, null)
        d = (eps_fd / 1000) * v
        up = model(x_t + d, p.t + eps_fd, p.r, cond)
        um = model(x_t - d, p.t - eps_fd, p.r, cond)
        dudt = (up - um) / (2 * eps_fd * w)
    target = meanflow_target(v, p.t, p.r, dudt)
    losses = (fuse_guidance(u_c, u_u, w) - target).pow(2).flatten(1).mean(1) * beta08_weight(p.t)
    return losses.mean()


def time_step(fn, params, iters):
    opt = torch.optim.AdamW(params, lr=1e-6)
    for i in range(iters + 2):  # two warm-up iterations
        if i == 2:
            start = time.perf_counter()
        opt.zero_grad()
        fn().backward()
        opt.step()
    return (time.perf_counter() - start) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    binding, mcfg = shapes_setup(args.threads)
    student = binding.student_from(binding.velocity_net(mcfg), mcfg)
    params = [p for p in student.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x0, cond = binding.batch(args.batch, g)
    null = binding.null_cond.expand(args.batch, -1, -1)
    ours = Stage1Objective(Stage1Config(cond_dropout=0.0), binding.null_cond)
    jvp = Stage1Objective(Stage1Config(cond_dropout=0.0, derivative="jvp"), binding.null_cond)
    rows = {
        "flow matching": lambda: flow_matching_step(student, x0, cond, None, generator=g)[0],
        "stage 1, official layout": lambda: official_layout_loss(student, x0, cond, null, g),
        "stage 1, anystep (batched)": lambda: ours(student, x0, cond, g)[0],
        "stage 1, exact JVP": lambda: jvp(student, x0, cond, g)[0],
    }
    print(f"shapes student ({sum(p.numel() for p in params) / 1e6:.2f}M params), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {args.iters} timed iterations each")
    times = {name: time_step(fn, params, args.iters) for name, fn in rows.items()}
    base = times["flow matching"]
    print(f"{'step':<30}{'s/iter':>10}{'x flow matching':>18}")
    for name, t in times.items():
        print(f"{name:<30}{t:>10.3f}{t / base:>18.2f}")
    print("paper (Wan-1.3B, fusion + central difference): 1.73x")


if __name__ == "__main__":
    main()
