"""The paper's Table 4 (training cost) on the shapes model, measured in one run: seconds per training
iteration and the ratio to plain flow matching.

    python benchmarks/training_cost.py [--iters 12] [--threads 2]

Every row is a full iteration of anystep's own trainer (``Trainer.train_step``: data, forwards, backward,
clipping, AdamW, EMA) on the same tiny Wan / AnyFlow networks (random weights: cost does not depend on them):
  flow matching                     the teacher's loss (batch 32)
  + guidance fusion                 Stage 1 with every sample in the diffusion bucket: one null-branch
                                    no-grad call, no derivative
  + central difference              the full Stage-1 loss (buckets 50/25/25, difference points batched)
  + exact JVP                       the Stage-1 loss with torch.func.jvp instead of the difference
  flow-map backward sim. N=4/16     a Stage-2 iteration (generator: <= 3-call rollout with gradient, DMD,
                                    co-trained Stage-1 loss; critic: no-grad rollout + flow matching),
                                    N fixed, k uniform
  ... without co-trained loss       the same, DMD + critic only (the like-for-like row for the next one)
  consistency backward sim. N=4/16  the Self-Forcing / rCM-style rollout (k + 1 calls, re-noising) with the
                                    same DMD and critic, no co-trained loss
Stage-2 rows average over many iterations because their cost depends on the random k. Paper (Wan-1.3B,
8xH100): flow map 53.1 -> 53.1 s/iter from 4 to 16 steps, consistency 45.9 -> 93.8. Run it alone: other
processes on a 2-core machine distort CPU timings.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from _shapes import shapes_setup

from anystep.config import Stage2Config
from anystep.objectives.flowmap import Stage1Config
from anystep.train.loop import Trainer
from anystep.train.methods import Stage1, Stage2, TeacherFineTune


def seconds_per_iter(method, iters: int, warmup: int = 2) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(method, steps=iters + warmup, out_dir=tmp, seed=0,
                          optim={"lr": 1e-7, "betas": (0.9, 0.95)}, progress=False)
        for i in range(iters + warmup):
            if i == warmup:
                start = time.perf_counter()
            trainer.train_step()
            trainer.step += 1
    return (time.perf_counter() - start) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=12, help="timed iterations per row (Stage 2 rows: 3x)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dmd-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    binding, mcfg = shapes_setup(args.threads)
    teacher = binding.velocity_net(mcfg)

    def student():
        return binding.student_from(copy.deepcopy(teacher), mcfg)

    def stage2(n: int, rollout: str, cotrain: float) -> Stage2:
        cfg = Stage2Config(rollout=rollout, rollout_steps=(n,), dmd_batch_size=args.dmd_batch,
                           cotrain_weight=cotrain)
        frozen = copy.deepcopy(teacher).requires_grad_(False)
        return Stage2(student(), copy.deepcopy(teacher), frozen, binding, args.batch, cfg, Stage1Config())

    rows = {
        "flow matching": lambda: TeacherFineTune(copy.deepcopy(teacher), binding, args.batch),
        "+ guidance fusion": lambda: Stage1(student(), binding, args.batch,
                                            Stage1Config(diffusion_ratio=1.0, consistency_ratio=0.0)),
        "+ central difference": lambda: Stage1(student(), binding, args.batch, Stage1Config()),
        "+ exact JVP (instead)": lambda: Stage1(student(), binding, args.batch, Stage1Config(derivative="jvp")),
    }
    stage2_rows = {}
    for n in (4, 16):
        stage2_rows[f"flow-map backward sim. N={n}"] = (lambda n=n: stage2(n, "flowmap", 1.0))
    for n in (4, 16):
        stage2_rows[f"  ... without co-trained loss N={n}"] = (lambda n=n: stage2(n, "flowmap", 0.0))
    for n in (4, 16):
        stage2_rows[f"consistency backward sim. N={n}"] = (lambda n=n: stage2(n, "consistency", 0.0))
    print(f"shapes model ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params), batch {args.batch}, "
          f"DMD batch {args.dmd_batch}, {torch.get_num_threads()} threads")
    times = {name: seconds_per_iter(make(), args.iters) for name, make in rows.items()}
    times |= {name: seconds_per_iter(make(), 3 * args.iters) for name, make in stage2_rows.items()}
    base = times["flow matching"]
    print(f"{'iteration':<38}{'s/iter':>9}{'x flow matching':>18}")
    for name, t in times.items():
        print(f"{name:<38}{t:>9.3f}{t / base:>18.2f}")
    for kind in ("flow-map backward sim.", "consistency backward sim."):
        a, b = times[f"{kind} N=4"], times[f"{kind} N=16"]
        print(f"{kind} N=16 / N=4: {b / a:.2f}x")
    print("paper (Wan-1.3B, 8xH100): fusion + difference 1.73x flow matching; flow map 53.1 -> 53.1 s/iter "
          "(1.00x) from N=4 to 16, consistency 45.9 -> 93.8 (2.04x)")


if __name__ == "__main__":
    main()
