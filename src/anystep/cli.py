"""``anystep``: train any-step video generators with AnyFlow.

    anystep demo                      the whole method on the toy shapes world, in minutes on a CPU
    anystep teacher  [--config P] [key=value ...]     flow-matching teacher (fine-tune)
    anystep stage1   [--config P] [key=value ...]     Stage 1: forward flow-map training
    anystep sample   CHECKPOINT --steps N             sample videos at any N
    anystep sweep    CHECKPOINT --steps 1,2,4,...     metrics vs N: table, plot, video grid
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import preset_names, resolve, to_yaml

EPILOG = """examples:
  anystep demo
  anystep stage1 --config shapes_stage1 train.steps=200 train.out_dir=runs/s1 --dry-run
  anystep sweep runs/s1 --steps 1,2,4,8,16,32 --teacher shipped:shapes_teacher
overrides are dotted keys of the config (see --dry-run for all of them): train.steps=500
optim.lr=1e-4 stage1.derivative=jvp world.name=gmm ...  Presets: """


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"sampling steps must be integers >= 1, got {text!r}")
    return steps


def _train_parser(sub, name: str, help_: str, preset: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG + ", ".join(preset_names()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=preset, help=f"a preset name or a YAML file (default: {preset})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                   help="continue from this checkpoint (a run folder or a step_* folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anystep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train any-step video generators with AnyFlow: one set of weights that samples in 1 step "
                    "for a preview and in 32 for the final render.\nEvery command runs on a CPU-sized toy "
                    "world by default.", epilog=__doc__.split("\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="teacher -> Stage 1 -> sweep on the shapes world (about 10 min on 2 cores)",
                       description="The main job: start from the shipped shapes teacher, run Stage 1, then sweep "
                                   "N = 1..32 for the student and the teacher's Euler sampler. Prints the table "
                                   "and where the plot and videos are.")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the Stage-1 config")
    d.add_argument("--dry-run", action="store_true", help="print the resolved Stage-1 config and exit")
    d.add_argument("--no-progress", action="store_true")

    _train_parser(sub, "teacher", "train a velocity teacher by flow matching", "shapes_teacher")
    _train_parser(sub, "stage1", "Stage 1: forward flow-map training of the student", "shapes_stage1")

    s = sub.add_parser("sample", help="sample from a trained model at any number of steps",
                       description="Sample a trained student (flow-map Euler) or teacher (Euler + CFG) at N "
                                   "steps; writes mp4, GIF and a PNG strip (gmm: a scatter plot).")
    s.add_argument("checkpoint", help="run folder, checkpoint folder, or shipped:<name>")
    s.add_argument("--steps", type=int, default=4, help="number of sampling steps N >= 1 (default 4)")
    s.add_argument("--prompt", action="append", help="shapes world prompt, e.g. 'a red disk moving left' "
                                                     "(repeatable; default: random prompts)")
    s.add_argument("--num", type=int, default=4, help="number of samples (default 4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: 1 for a student, whose guidance is fused; the run's w for a teacher)")
    s.add_argument("--out", default="samples/sample", help="output path stem (default samples/sample)")

    w = sub.add_parser("sweep", help="metrics vs number of steps: table, plot and video grid",
                       description="Sample the student at every N with the same noises and prompts, score with "
                                   "the world's exact judge, and compare with the teacher's Euler sampler.")
    w.add_argument("checkpoint", help="the student's run folder or checkpoint")
    w.add_argument("--steps", type=_parse_steps, default=None, help="comma-separated N (default 1,2,4,8,16,32)")
    w.add_argument("--teacher", default=None, help="teacher checkpoint for the Euler baseline (default: the "
                                                   "student run's model.init; gmm: the exact teacher)")
    w.add_argument("--num-samples", type=int, default=None)
    w.add_argument("--out", default=None, help="output folder (default: <run>/sweep)")
    w.add_argument("--no-progress", action="store_true")
    return parser


# ------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .recipes import train

    cfg = resolve(args.config, args.overrides)
    if cfg.train.threads:
        import torch
        torch.set_num_threads(cfg.train.threads)
    if args.command != cfg.kind:
        raise ValueError(f"config {args.config!r} is a {cfg.kind!r} config; use `anystep {cfg.kind}`")
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    ckpt = train(cfg, resume=args.resume_from or args.resume, progress=not args.no_progress)
    print(f"done: checkpoint {ckpt}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .flowmap import guided, sample
    from .recipes import load_model
    from .worlds.binding import make_binding

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    model, cfg, role = load_model(args.checkpoint)
    binding = make_binding(cfg.world)
    ev = binding.eval_set(args.num, args.seed)
    if args.prompt:
        if binding.name != "shapes":
            raise ValueError("--prompt is for the shapes world")
        g = torch.Generator().manual_seed(args.seed)
        specs = [binding.world.sample_specs(1, g, prompt=p)[0] for p in (args.prompt * args.num)[:args.num]]
        ev.cond, ev.meta = binding.embed(specs), specs
    student = role == "student"
    default_w = 1.0 if student else (cfg.stage1.fuse_guidance_scale or 1.0)
    w = default_w if args.guidance is None else args.guidance
    x = sample(guided(model, w, binding.null_cond), ev.noise, ev.cond, args.steps, mean_velocity=student)
    rows = {f"{role} N={args.steps}": x}
    path = binding.save_picture(rows, ev, Path(args.out))
    print(f"wrote {path}" + (" (+ .gif, .png strip)" if path.suffix == ".mp4" else ""))
    return 0


def cmd_sweep(args) -> int:
    from .evaluate.sweep import Sampler, markdown_table, run_sweep
    from .recipes import load_model, resolve_checkpoint
    from .worlds.binding import make_binding

    student, cfg, role = load_model(args.checkpoint)
    sweep = cfg.sweep
    if args.steps:
        sweep = replace(sweep, steps=args.steps)
    if args.num_samples:
        sweep = replace(sweep, num_samples=args.num_samples)
    binding = make_binding(cfg.world)
    w = cfg.stage1.fuse_guidance_scale or 1.0
    samplers = [Sampler(role, student, sweep.student_guidance if role == "student" else w, role == "student")]
    teacher_spec = args.teacher or cfg.model.init
    if sweep.teacher and binding.reference_teacher() is not None:
        samplers.append(Sampler("teacher (exact) Euler", binding.reference_teacher(), sweep.teacher_guidance, False))
    elif sweep.teacher and teacher_spec and role == "student":
        teacher, _, _ = load_model(teacher_spec, role="teacher")
        samplers.append(Sampler("teacher Euler", teacher, sweep.teacher_guidance, False))
    run_dir = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else (run_dir.parent.parent if run_dir.parent.name == "checkpoints"
                                           else run_dir) / "sweep"
    rows = run_sweep(samplers, binding, sweep, out, eval_guidance=w, progress=not args.no_progress)
    print(markdown_table(rows))
    print(f"table: {out / 'sweep.md'}  plot: {out / 'sweep.png'}  videos: {out / 'grid.mp4'}")
    return 0


def cmd_demo(args) -> int:
    from .evaluate.sweep import Sampler, markdown_table, run_sweep
    from .recipes import load_model, train
    from .worlds.binding import make_binding

    out = Path(args.out)
    cfg = resolve("shapes_stage1", [f"train.out_dir={out / 'stage1'}", *args.overrides])
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    start = time.time()
    print(f"[1/2] Stage 1 from the shipped teacher ({cfg.model.init}): {cfg.train.steps} steps")
    ckpt = train(cfg, progress=not args.no_progress)
    print(f"      done in {time.time() - start:.0f} s: {ckpt}")
    print("[2/2] sweep N =", ",".join(map(str, cfg.sweep.steps)))
    student, _, _ = load_model(str(ckpt))
    teacher, _, _ = load_model(cfg.model.init, role="teacher")
    binding = make_binding(cfg.world)
    w = cfg.stage1.fuse_guidance_scale or 1.0
    samplers = [Sampler("student", student, 1.0, True),
                Sampler("teacher Euler", teacher, cfg.sweep.teacher_guidance, False)]
    rows = run_sweep(samplers, binding, cfg.sweep, out / "sweep", eval_guidance=w, progress=not args.no_progress)
    print()
    print(markdown_table(rows))
    print(f"total time {time.time() - start:.0f} s")
    print(f"table: {out / 'sweep' / 'sweep.md'}\nplot:  {out / 'sweep' / 'sweep.png'}\n"
          f"videos: {out / 'sweep' / 'grid.mp4'} (rows: sampler and N; also grid.gif, grid.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"demo": cmd_demo, "teacher": cmd_train, "stage1": cmd_train, "sample": cmd_sample,
                "sweep": cmd_sweep}
    import torch
    torch.set_flush_denormal(True)  # subnormal floats made CPU steps 10-30x slower
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteLossError
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError) as err:
        print(f"anystep {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_flush_denormal(False)  # back to the process default for callers of main()


if __name__ == "__main__":
    sys.exit(main())
