"""The paper's Table 4 (training cost) on the shapes model, measured in one run: seconds per training
iteration and the ratio to plain flow matching.

    python benchmarks/training_cost.py [--iters 12] [--threads 2]

Every row is a full iteration of anystep's own trainer (``Trainer.train_step``: data, forwards, backward,
clipping, AdamW, EMA, with the kind's own optimizer and EMA settings) of a method made by anystep's run kinds
(``kind(...).make``), on the same tiny Wan / AnyFlow networks (random weights: cost does not depend on them):
  flow matching                     the teacher kind (batch 32)
  + guidance fusion                 the stage1 kind with every sample in the diffusion bucket: one null-branch
                                    no-grad call, no derivative
  + central difference              the full Stage-1 loss (buckets 50/25/25, difference points batched)
  + exact JVP                       the Stage-1 loss with torch.func.jvp instead of the difference
  flow-map backward sim. N=4/16     the stage2 kind (generator: <= 3-call rollout with gradient, DMD,
                                    co-trained Stage-1 loss; critic: no-grad rollout + flow matching),
                                    N fixed, k uniform
  ... without co-trained loss       the same, DMD + critic only (stage2.cotrain_weight=0: the like-for-like
                                    row for the next one)
  consistency backward sim. N=4/16  the cbs kind: the Self-Forcing / rCM-style rollout (k + 1 calls,
                                    re-noising) with the same DMD and critic, no co-trained loss
Stage-2 rows average over many iterations because their cost depends on the random k. Paper (Wan-1.3B,
8xH100): flow map 53.1 -> 53.1 s/iter from 4 to 16 steps, consistency 45.9 -> 93.8. Run it alone: other
processes on a 2-core machine distort CPU timings.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from _common import make_method, n_params, print_ratio_table, seconds_per_iter, shapes_setup, with_section
from torch import nn

from anystep.models import zoo
from anystep.objectives.flowmap import Stage1Config

Row = Callable[[], tuple[str, object]]   # -> (kind, method), made when the row is timed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=12, help="timed iterations per row (Stage 2 rows: 3x)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dmd-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def stage1_rows(world, teacher: nn.Module, batch: int) -> dict[str, Row]:
    """Flow matching and the three Stage-1 variants, each on its own copy of the network."""
    def stage1(**changes) -> tuple[str, object]:
        student = zoo.student_from(teacher)
        return "stage1", make_method("stage1", {"student": student}, world, batch, stage1=Stage1Config(**changes))
    return {
        "flow matching": lambda: ("teacher", make_method("teacher", {"teacher": copy.deepcopy(teacher)}, world,
                                                         batch)),
        "+ guidance fusion": lambda: stage1(diffusion_ratio=1.0, consistency_ratio=0.0),
        "+ central difference": lambda: stage1(),
        "+ exact JVP (instead)": lambda: stage1(derivative="jvp"),
    }


def stage2_rows(world, teacher: nn.Module, batch: int, dmd_batch: int) -> dict[str, Row]:
    """Flow-map Stage 2 with and without the co-trained loss, and the consistency rollout (cbs), at N = 4, 16."""
    def roles() -> dict[str, nn.Module]:
        return {"student": zoo.student_from(teacher), "critic": copy.deepcopy(teacher),
                "teacher": copy.deepcopy(teacher)}

    def stage2(n: int, cotrain: float) -> tuple[str, object]:
        section = with_section("stage2", "stage2", rollout_steps=(n,), dmd_batch_size=dmd_batch,
                               cotrain_weight=cotrain)
        return "stage2", make_method("stage2", roles(), world, batch, stage2=section)

    def cbs(n: int) -> tuple[str, object]:
        section = with_section("cbs", "cbs", rollout_steps=(n,), dmd_batch_size=dmd_batch)
        return "cbs", make_method("cbs", roles(), world, batch, cbs=section)

    rows: dict[str, Row] = {}
    rows |= {f"flow-map backward sim. N={n}": (lambda n=n: stage2(n, 1.0)) for n in (4, 16)}
    rows |= {f"  ... without co-trained loss N={n}": (lambda n=n: stage2(n, 0.0)) for n in (4, 16)}
    rows |= {f"consistency backward sim. N={n}": (lambda n=n: cbs(n)) for n in (4, 16)}
    return rows


def timed(rows: dict[str, Row], iters: int) -> dict[str, float]:
    return {name: seconds_per_iter(method, kind_name, iters)
            for name, (kind_name, method) in ((name, make()) for name, make in rows.items())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; prints the table and returns the seconds per iteration of each row."""
    args = parse_args(argv)
    world, teacher = shapes_setup(args.threads)
    print(f"shapes model ({n_params(teacher) / 1e6:.2f}M params), batch {args.batch}, "
          f"DMD batch {args.dmd_batch}, {torch.get_num_threads()} threads")
    times = timed(stage1_rows(world, teacher, args.batch), args.iters)
    times |= timed(stage2_rows(world, teacher, args.batch, args.dmd_batch), 3 * args.iters)
    print_ratio_table(times, "iteration", 38, 9)
    for kind in ("flow-map backward sim.", "consistency backward sim."):
        a, b = times[f"{kind} N=4"], times[f"{kind} N=16"]
        print(f"{kind} N=16 / N=4: {b / a:.2f}x")
    print("paper (Wan-1.3B, 8xH100): fusion + difference 1.73x flow matching; flow map 53.1 -> 53.1 s/iter "
          "(1.00x) from N=4 to 16, consistency 45.9 -> 93.8 (2.04x)")
    return times


if __name__ == "__main__":
    main()
