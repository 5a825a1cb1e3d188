"""Cost of a Stage-1 step over a plain flow-matching step, on the shapes student, measured in one run.

    python benchmarks/stage1_cost.py [--batch 32] [--iters 6] [--threads 2]

Rows (each a full iteration of anystep's trainer, ``Trainer.train_step``: forward(s), backward, clipping,
AdamW, EMA, on one fixed batch so that making the data is not in the time):
  flow matching                   the teacher kind's method (plain flow matching) on the student, 1 forward
                                  with grad
  stage 1, official layout        the Stage-1 kind's method, its no-grad call run as the official code runs
                                  it: 3 separate forwards of the whole batch (null branch, t+eps, t-eps), the
                                  difference taken for every sample (see :class:`SeparateCalls`)
  stage 1, anystep (batched)      the same loss as anystep runs it: one no-grad call holding the null branch and
                                  the difference points of the non-diffusion samples only
  stage 1, exact JVP              fused guidance + torch.func.jvp (math attention on CPU)
The paper reports 1.73x for fusion + difference over flow matching (Wan-1.3B, GPUs).
Run it alone: other processes on a 2-core machine distort CPU timings badly.
"""

from __future__ import annotations

import argparse

import torch
from _common import FixedBatch, make_method, n_params, print_ratio_table, seconds_per_iter, shapes_setup
from torch import nn

from anystep.kinds.teacher import TeacherConfig
from anystep.models import zoo
from anystep.objectives.flowmap import Stage1Config


class SeparateCalls(nn.Module):
    """The student as the official Stage-1 step calls it. The library's objective asks for the null branch and
    the difference points in one batched no-grad call ``[null (B) | t + eps (n) | t - eps (n)]``, with n <= B
    (no difference points where r = t, whose derivative is multiplied by 0); the official code makes three
    separate no-grad calls of the whole batch. Here each part is its own call, the difference parts filled up to
    B rows (the official work at r = t, outputs dropped). Calls with gradient pass through."""

    def __init__(self, model: nn.Module, batch: int):
        super().__init__()
        self.model, self.batch = model, batch

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.model(x, t, r, cond)
        b = self.batch
        n = (x.shape[0] - b) // 2
        outs = [self.model(x[:b], t[:b], r[:b], cond[:b])]
        for start in (b, b + n):                      # plus points, minus points
            rows = torch.cat([torch.arange(start, start + n), torch.arange(b - n)])
            outs.append(self.model(x[rows], t[rows], r[rows], cond[rows])[:n])
        return torch.cat(outs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def rows(student: nn.Module, world: FixedBatch, batch: int) -> dict[str, tuple[str, object]]:
    """Each row's (kind, method), all on the same student and batch (no condition dropout)."""
    def stage1(model: nn.Module, **changes) -> object:
        return make_method("stage1", {"student": model}, world, batch, stage1=Stage1Config(cond_dropout=0.0,
                                                                                           **changes))
    return {
        "flow matching": ("teacher", make_method("teacher", {"teacher": student}, world, batch,
                                                 teacher=TeacherConfig(cond_dropout=0.0))),
        "stage 1, official layout": ("stage1", stage1(SeparateCalls(student, batch))),
        "stage 1, anystep (batched)": ("stage1", stage1(student)),
        "stage 1, exact JVP": ("stage1", stage1(student, derivative="jvp")),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; prints the table and returns the seconds per iteration of each row."""
    args = parse_args(argv)
    shapes, velocity = shapes_setup(args.threads)
    student = zoo.student_from(velocity)
    world = FixedBatch(shapes, args.batch, torch.Generator().manual_seed(0))
    print(f"shapes student ({n_params(student) / 1e6:.2f}M params), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {args.iters} timed iterations each")
    times = {name: seconds_per_iter(method, kind_name, args.iters)
             for name, (kind_name, method) in rows(student, world, args.batch).items()}
    print_ratio_table(times, "step", 30, 10)
    print("paper (Wan-1.3B, fusion + central difference): 1.73x")
    return times


if __name__ == "__main__":
    main()
