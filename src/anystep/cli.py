"""``anystep``: train any-step video generators with AnyFlow.

    anystep demo                      the whole method on the toy shapes world, in minutes on a CPU
    anystep teacher  [--config P] [key=value ...]     flow-matching teacher (fine-tune)
    anystep stage1   [--config P] [key=value ...]     Stage 1: forward flow-map training
    anystep stage2   [--config P] [key=value ...]     Stage 2: on-policy flow-map distillation (DMD)
    anystep consistency [--config P] [key=value ...]  baseline: consistency distillation
    anystep cbs      [--config P] [key=value ...]     baseline: consistency backward simulation + DMD
    anystep sample   RUN --steps N [--save F.safetensors]  sample at any N (causal: --given-frames for I2V/V2V)
    anystep sweep    RUN [RUN ...] --steps 1,2,4,...  metrics vs N: table, plot, video grid
    anystep report   RUN                              what a run did: config diff, progress, losses, validation,
                                                      files, the commands to resume and export (RUN/report.md)
    anystep reproduce [--quick]                       the paper's claims checked on the toy worlds: one report

  the real Wan2.1 path (local diffusers folders; nothing is downloaded):
    anystep cache      --model WAN_DIR --videos VIDEOS --out CACHE   videos + captions -> latents + embeddings
    anystep synthesize --model WAN_DIR --prompts FILE --out CACHE    teacher samples -> the same format
    anystep teacher|stage1|stage2 --config wan1.3b_stage1 world.wan.model=WAN_DIR world.wan.data=CACHE
    anystep export     RUN --out DIR                                 an AnyFlowPipeline folder
    anystep tiny-wan   DIR                                           a tiny random Wan2.1 folder (tests, trying)

The parsers and the handlers live here; what a command does lives in :mod:`anystep.recipes` (callable from
Python). A :class:`~anystep.errors.UsageError` (and the checkpoint, cache and folder errors) is printed as one line
with exit status 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from .config import preset_names, resolve, to_yaml
from .errors import UsageError
from .kinds import all_kinds

EPILOG = """examples:
  anystep demo
  anystep stage1 --config shapes_stage1 train.steps=200 train.out_dir=runs/s1 --dry-run
  anystep sweep runs/s1 --steps 1,2,4,8,16,32 --teacher shipped:shapes_teacher
overrides are dotted keys of the config, anywhere on the line (see --dry-run for all of them): train.steps=500
optim.student.lr=1e-4 stage1.derivative=jvp world.name=gmm ...  Presets: """


# What each command does, shown by its --help (argparse re-wraps the text).
DESCRIPTIONS = {
    "demo": """
        The main job, from the shipped shapes teacher: Stage 1, Stage 2, the two consistency
        baselines (CD; CBS+DMD), then the sweep N = 1..32 of all of them and the teacher's Euler
        sampler: table, plot, videos. Every run starts fresh (again in --out: replaced).
    """,
    "reproduce": """
        The paper's claims checked on the toy worlds: a dozen gmm runs (AnyFlow Stage 1 and Stage 2
        with one switch changed each: time weight, embedding init, derivative, rollout gradient,
        co-trained loss, rebalance power; the consistency baselines) and the causal shapes students
        (exposure bias), two at a time, then one sweep and a markdown report with plots: per claim,
        the paper's statement, the measured curves, and a verdict by a rule stated in the report.
        About an hour on 2 idle cores; finished runs in --out are reused. --quick runs the same
        pipeline in minutes (its numbers measure nothing).
    """,
    "sample": """
        Sample a trained student (flow-map Euler) or teacher (Euler + CFG) at N steps; writes mp4,
        GIF and a PNG strip (gmm: a scatter plot), and with --save FILE.safetensors the samples
        themselves (latents or videos, their prompts / labels, the settings) to judge elsewhere.
    """,
    "sweep": """
        Sample the runs at every N with the same noises and prompts, score with the world's exact
        judge, and compare with the teacher's Euler sampler. Wan runs are judged against the
        teacher's sweep.teacher_steps-step samples from the same noises and prompts (latent RMSE,
        PSNR after decoding), by temporal flicker and, with sweep.clip=CLIP_DIR, the CLIP score; an
        exported folder takes world.wan.model=WAN_DIR (its teacher) and world.wan.data=CACHE.
    """,
    "cache": """
        Encode (video, caption) pairs with the model folder's VAE (posterior mean, normalised) and
        UMT5 text encoder, plus the negative-prompt embedding (the null prompt), as sharded
        safetensors; resumable. Frames as the official code prepares them: 16 fps from each video's
        own rate, stretched to HEIGHT x WIDTH (see --fps, --stride, --resize); the choices are
        recorded in the cache.
    """,
    "synthesize": """
        Sample the teacher (the folder's Wan transformer, or a teacher run's) with CFG for every
        prompt and store the latents and embeddings in the cache format (the paper trains on 256K
        such prompt-video pairs). Resumable.
    """,
    "export": """
        The student's EMA weights, LoRA merged (or kept as adapters), with the source folder's VAE,
        text encoder and tokenizer and FlowMapEulerDiscreteScheduler(shift=5): load it with
        AnyFlowPipeline.from_pretrained(DIR) and sample at any number of steps.
    """,
    "report": """
        A run's own report, from its folder alone: kind, world, preset and the config's differences
        from it; steps done and planned, training time and steps/s; the last losses; the best
        validation figures per N; where the checkpoints, videos and tracker logs are; and the command
        lines that resume, sample and export it. Printed, and written as markdown (default
        RUN/report.md). RUN: a run folder (finished, training or killed), a checkpoint folder, or
        shipped:<name>.
    """,
    "tiny-wan": """
        A Wan2.1 T2V diffusers folder with every part tiny and random: the whole real path (cache,
        synthesize, train, export) runs on it in seconds.
    """,
}


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"sampling steps must be integers >= 1, got {text!r}")
    return steps


def _parse_budget(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget takes four integers S1,S2,CD,CBS, got {text!r}") from None
    if len(steps) != 4 or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--budget takes four integers >= 1 (S1,S2,CD,CBS), got {text!r}")
    return steps


# ------------------------------------------------------------------------------------------------------ parsers
def _train_parser(sub, name: str, help_: str, preset: str | None) -> None:
    p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG + ", ".join(preset_names()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=preset,
                   help=f"a preset name or a YAML file (default: {preset or 'the config defaults'})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (anywhere)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the run's newest complete checkpoint (an error when there is none)")
    start.add_argument("--resume-if-present", action="store_true",
                       help="continue from the run's newest complete checkpoint when there is one, else start "
                            "(for restart scripts)")
    start.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                       help="continue from this checkpoint (a run folder or a step_* folder)")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in an out_dir that already holds a run: its checkpoints and metrics are "
                            "deleted (without this flag or a resume flag, such a folder is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _demo_parser(sub) -> None:
    from .recipes.demo import FULL, SHORT

    d = sub.add_parser("demo", help="Stage 1 -> Stage 2 -> baselines -> sweep on the shapes world (~8 min on 2 cores)", description=DESCRIPTIONS["demo"])
    d.add_argument("--out", default="runs/demo",
                   help="output folder (default: runs/demo); stage runs already in it are started over")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides applied to every stage's config (e.g. train.threads=1)")
    d.add_argument("--full", action="store_true", help=f"longer budgets: {FULL} (about 2.5x the default run)")
    d.add_argument("--budget", type=_parse_budget, default=None, metavar="S1,S2,CD,CBS",
                   help=f"training steps of each stage (default {','.join(map(str, SHORT))})")
    d.add_argument("--no-baselines", action="store_true", help="skip the consistency baselines")
    d.add_argument("--sequential", action="store_true",
                   help="train the baselines after AnyFlow in this process (default: the two chains train side "
                        "by side in two processes, each on half the CPU cores, when there are two or more)")
    d.add_argument("--dry-run", action="store_true", help="print the resolved configs and exit")
    d.add_argument("--no-progress", action="store_true")


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="sample from a trained model at any number of steps", description=DESCRIPTIONS["sample"])
    s.add_argument("checkpoint", help="run folder, checkpoint folder, or shipped:<name>")
    s.add_argument("--steps", type=int, default=4, help="number of sampling steps N >= 1 (default 4)")
    s.add_argument("--prompt", action="append", help="shapes world prompt, e.g. 'a red disk moving left' "
                                                     "(repeatable; default: random prompts)")
    s.add_argument("--num", type=int, default=4, help="number of samples (default 4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: 1 for a student, whose guidance is fused; the run's "
                        "sweep.teacher_guidance, 3, for a teacher)")
    s.add_argument("--out", default="samples/sample", help="picture path stem (default samples/sample)")
    s.add_argument("--save", default=None, metavar="FILE.safetensors",
                   help="also save the samples (gmm: latents; shapes: videos in [-1, 1]) with their noises, "
                        "conditions, prompts / labels and the settings (metadata) as one safetensors file; "
                        "read it back with anystep.load_samples(FILE)")
    s.add_argument("--no-picture", action="store_true", help="write no picture (with --save: the file only)")
    s.add_argument("--given-frames", type=int, default=0, metavar="K",
                   help="causal students: condition on the first K real frames (whole chunks; 1 = I2V, more = "
                        "V2V) and generate the rest")


def _sweep_parser(sub) -> None:
    w = sub.add_parser("sweep", help="metrics vs number of steps: table, plot and video grid", description=DESCRIPTIONS["sweep"])
    w.add_argument("checkpoint", nargs="+", help="one or more runs (run folders or checkpoints; each is sampled "
                                                "its kind's way: flow map, or consistency for the baselines), "
                                                "and sweep.KEY=VALUE overrides (e.g. sweep.teacher_steps=50, "
                                                "sweep.clip=CLIP_DIR: the wan world's)")
    w.add_argument("--steps", type=_parse_steps, default=None, help="comma-separated N (default 1,2,4,8,16,32)")
    w.add_argument("--teacher", default=None, help="teacher checkpoint for the Euler baseline (default: the "
                                                   "first run's teacher; gmm: the exact teacher; wan: the run's "
                                                   "teacher run, else the base model folder)")
    w.add_argument("--num-samples", type=int, default=None, help="clips / samples scored per N (default: the "
                                                                 "run's sweep.num_samples)")
    w.add_argument("--seed", type=int, default=None, help="seed of the noises and prompts (default: the run's "
                                                         "sweep.seed); sweep twice with other seeds to see the "
                                                         "metrics' sampling noise")
    w.add_argument("--out", default=None, help="output folder (default: <run>/sweep)")
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(overrides=[])   # sweep.KEY=VALUE items anywhere on the line (see parse)


def _data_parsers(sub) -> None:
    c = sub.add_parser("cache", help="encode videos + captions into a latent cache (VAE + UMT5, once)", description=DESCRIPTIONS["cache"])
    c.add_argument("--model", required=True, help="local Wan2.1 diffusers folder (vae/, text_encoder/, tokenizer/)")
    c.add_argument("--videos", required=True, help="a folder of .mp4 with captions.json / captions.txt / "
                                                   "same-name .txt files, or webdataset .tar shard(s)")
    _cache_args(c)
    c.add_argument("--fps", type=float, default=None,
                   help="resample each video in time to FPS frames per second, from the frame rate in its "
                        "metadata (default 16, the official rate; 0 turns it off: frames by --stride)")
    c.add_argument("--stride", type=int, default=None,
                   help="take every STRIDE-th source frame instead of resampling to an fps (implies --fps 0; "
                        "giving it with --fps > 0 is an error)")
    c.add_argument("--resize", choices=("stretch", "crop"), default="stretch",
                   help="stretch: resize the whole frame to HEIGHT x WIDTH without crop, aspect not kept (default, "
                        "official); crop: resize the short side and centre-crop")
    c.add_argument("--limit", type=int, default=None, help="cache only the first LIMIT videos")

    s = sub.add_parser("synthesize", help="teacher-generated training data: prompts -> teacher samples", description=DESCRIPTIONS["synthesize"])
    s.add_argument("--model", required=True, help="local Wan2.1 diffusers folder")
    s.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or .json (a list)")
    s.add_argument("--teacher", default=None, help="a teacher run to sample instead of the folder's transformer")
    s.add_argument("--steps", type=int, default=50, help="teacher sampling steps (default 50)")
    s.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5, Wan's)")
    s.add_argument("--seed", type=int, default=0)
    _cache_args(s)

def _report_parser(sub) -> None:
    r = sub.add_parser("report", help="what a run did and how to resume and export it (markdown)",
                       description=DESCRIPTIONS["report"])
    r.add_argument("run", help="a run folder, a checkpoint folder, or shipped:<name>")
    r.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the markdown (default RUN/report.md; a shipped checkpoint's: not written)")


def _reproduce_parser(sub) -> None:
    r = sub.add_parser("reproduce", help="check the paper's claims on the toy worlds: one markdown report",
                       description=DESCRIPTIONS["reproduce"])
    r.add_argument("--out", default=None, metavar="DIR",
                   help="where the runs, the sweep and report.md go (default runs/reproduce, with --quick "
                        "runs/reproduce_quick)")
    r.add_argument("--quick", action="store_true", help="a fiftieth of every budget, 500 samples: minutes")
    r.add_argument("--jobs", type=int, default=2, help="runs trained at once, one thread each (default 2)")


def _release_parsers(sub) -> None:
    e = sub.add_parser("export", help="write a trained student as a diffusers AnyFlowPipeline folder", description=DESCRIPTIONS["export"])
    e.add_argument("run", help="a Stage-1 or Stage-2 run (world.name=wan) or one of its checkpoints")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--adapters", action="store_true",
                   help="keep the LoRA as an adapter file beside the base (pipe.load_lora_weights(DIR))")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the transformer for release (default: keep float32)")
    e.add_argument("--shift", type=float, default=5.0, help="the scheduler's time shift (official 5)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    t = sub.add_parser("tiny-wan", help="write a tiny random-weight Wan2.1 T2V folder (offline tests, trying)", description=DESCRIPTIONS["tiny-wan"])
    t.add_argument("out", help="output folder")
    t.add_argument("--seed", type=int, default=0)



def _cache_args(p) -> None:
    p.add_argument("--out", required=True, help="cache folder (created; an existing one is continued)")
    p.add_argument("--frames", type=int, default=81, help="frames per clip, 4k+1 (default 81)")
    p.add_argument("--height", type=int, default=480, help="default 480")
    p.add_argument("--width", type=int, default=832, help="default 832")
    p.add_argument("--max-text-len", type=int, default=512, help="UMT5 tokens (default 512, Wan's)")
    p.add_argument("--shard-size", type=int, default=64, help="items per shard file (default 64)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="storage and encoder dtype (default bfloat16)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true")




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anystep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train any-step video generators with AnyFlow: one set of weights that samples in 1 step "
                    "for a preview and in 32 for the final render.\nEvery command runs on a CPU-sized toy "
                    "world by default.", epilog=__doc__.split("\n", 1)[1].split("\n\nThe parsers")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(sub)
    for k in all_kinds().values():
        _train_parser(sub, k.name, k.summary, k.preset)
    _sample_parser(sub)
    _data_parsers(sub)
    _release_parsers(sub)
    _sweep_parser(sub)
    _report_parser(sub)
    _reproduce_parser(sub)
    return parser


# ------------------------------------------------------------------------------------------------------ handlers
def cmd_train(args) -> int:
    from .recipes import train

    cfg = resolve(args.config, args.overrides if args.config else [f"kind={args.command}", *args.overrides])
    if args.command != cfg.kind:
        raise UsageError(f"config {args.config!r} is a {cfg.kind!r} config; use `anystep {cfg.kind}`")
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    ckpt = train(cfg, resume=args.resume_from or args.resume, progress=not args.no_progress,
                 resume_if_present=args.resume_if_present, overwrite=args.overwrite, preset=args.config,
                 overrides=args.overrides)
    from .train.distributed import main_process

    if main_process():   # under torchrun, rank 0 speaks for all
        print(f"done: checkpoint {ckpt}")
    return 0


def cmd_demo(args) -> int:
    from .recipes.demo import FULL, SHORT, demo, demo_configs

    budget = args.budget or (FULL if args.full else SHORT)
    if args.dry_run:
        for title, cfg in demo_configs(args.out, budget, not args.no_baselines, args.overrides):
            print(f"# {title}\n{to_yaml(cfg)}")
        return 0
    start = time.time()
    result = demo(args.out, budget, not args.no_baselines, args.sequential, args.overrides, not args.no_progress)
    print(f"\n{result.table}total time {time.time() - start:.0f} s")
    print(f"table: {result.out / 'sweep.md'}\nplot:  {result.out / 'sweep.png'}\n"
          f"videos: {result.out / 'grid.mp4'} (rows: sampler and N; also grid.gif, grid.png)")
    return 0


def cmd_sample(args) -> int:
    from .recipes import sample_run

    paths = sample_run(args.checkpoint, args.steps, prompts=args.prompt, num=args.num, seed=args.seed,
                       guidance=args.guidance, given_frames=args.given_frames,
                       out=None if args.no_picture else args.out, save=args.save)
    for path in paths:
        print(f"wrote {path}" + (" (+ .gif, .png strip)" if path.suffix == ".mp4" else ""))
    return 0


def cmd_sweep(args) -> int:
    from .recipes import sweep

    items = [*args.checkpoint, *args.overrides]
    runs = [a for a in items if "=" not in a]
    settings, world = _sweep_overrides([a for a in items if "=" in a])
    settings.update({k: v for k, v in (("steps", args.steps), ("num_samples", args.num_samples),
                                       ("seed", args.seed)) if v is not None})
    if not runs:
        raise UsageError("anystep sweep needs at least one run folder besides the sweep.KEY=VALUE overrides")
    result = sweep(runs, teacher=args.teacher, settings=settings, out=args.out, world=world,
                   progress=not args.no_progress)
    picture = next(result.out.glob("grid.*"))
    print(result.table + f"table: {result.out / 'sweep.md'}  plot: {result.out / 'sweep.png'}  samples: "
          f"{result.out / ('grid.mp4' if (result.out / 'grid.mp4').exists() else picture.name)}")
    return 0


def _sweep_overrides(items: list[str]) -> tuple[dict, dict]:
    """``sweep.KEY=VALUE`` items (values as YAML) as the sweep's settings, ``world.wan.KEY=VALUE`` as an exported
    folder's world; any other key is an error."""
    from .config import apply_override

    data: dict = {}
    for item in items:
        if not item.startswith(("sweep.", "world.wan.")):
            raise UsageError(f"{item!r}: the sweep command takes sweep.KEY=VALUE overrides (e.g. "
                             "sweep.teacher_steps=50 sweep.clip=CLIP_DIR) and, for an exported folder, "
                             "world.wan.model=WAN_DIR world.wan.data=CACHE")
        apply_override(data, item)
    return data.get("sweep", {}), data.get("world", {}).get("wan", {})


@contextlib.contextmanager
def _split(args):
    """A data command's place among torchrun's processes: (the processes, its rank, world size, barrier and
    device as keyword arguments); one process without a launcher."""
    from .build import resolve_device
    from .train import distributed

    with distributed.session(args.device) as p:
        yield p, {"rank": p.rank, "world_size": p.world_size, "barrier": p.barrier,
                  "device": resolve_device(args.device, p)}


def cmd_cache(args) -> int:
    from .data.encode import cache_videos
    from .data.video_io import OFFICIAL_FPS

    fps = args.fps if args.fps is not None else (None if args.stride is not None else OFFICIAL_FPS)
    with _split(args) as (processes, where):
        out = cache_videos(args.model, args.videos, args.out, frames=args.frames, height=args.height,
                           width=args.width, fps=fps, stride=args.stride, resize=args.resize,
                           max_text_len=args.max_text_len, shard_size=args.shard_size, batch_size=args.batch_size,
                           dtype=args.dtype, progress=not args.no_progress, limit=args.limit, **where)
    if processes.main:
        print(f"cache: {out} (train with world.wan.data={out})")
    return 0


def cmd_synthesize(args) -> int:
    from .data.synthesize import read_prompts, synthesize
    from .recipes import teacher_transformer

    transformer = teacher_transformer(args.teacher, args.model) if args.teacher else None
    with _split(args) as (processes, where):
        out = synthesize(args.model, read_prompts(args.prompts), args.out, steps=args.steps,
                         guidance=args.guidance, frames=args.frames, height=args.height, width=args.width,
                         seed=args.seed, batch_size=args.batch_size, max_text_len=args.max_text_len,
                         shard_size=args.shard_size, dtype=args.dtype, transformer=transformer,
                         progress=not args.no_progress, **where)
    if processes.main:
        print(f"cache: {out} (train with world.wan.data={out})")
    return 0


def cmd_export(args) -> int:
    import torch

    from .recipes import export_run

    out = export_run(args.run, args.out, adapters=args.adapters, overwrite=args.overwrite, shift=args.shift,
                     dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"exported: {out}\n  {_load_hint(out, args.adapters)}")
    return 0


def _load_hint(folder: Path, adapters: bool) -> str:
    """How to load an exported folder: its pipeline class (``AnyFlowFARPipeline`` for a causal student, which
    needs ``anystep.patch_far_pipeline``) read from its ``model_index.json``."""
    import json

    pipeline = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    load = f"{pipeline}.from_pretrained({str(folder)!r})"
    lora = "; pipe.load_lora_weights(...)" if adapters else ""
    if pipeline == "AnyFlowFARPipeline":
        return (f"import anystep; from diffusers import {pipeline}; pipe = {load}{lora}; "
                "anystep.patch_far_pipeline(pipe)  # diffusers 0.42.1 pads the KV-cache step without a mask "
                "(see the folder's README.md)")
    return f"from diffusers import {pipeline}; pipe = {load}{lora}"


def cmd_report(args) -> int:
    from .recipes import report

    result = report(args.run, out=args.out)
    print(result.markdown, end="")
    if result.path is not None:
        print(f"\nwritten: {result.path}")
    return 0


def cmd_reproduce(args) -> int:
    from .recipes.reproduce import reproduce

    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    out = args.out or ("runs/reproduce_quick" if args.quick else "runs/reproduce")
    print(reproduce(out, quick=args.quick, jobs=args.jobs).read_text())
    return 0


def cmd_tiny_wan(args) -> int:
    from .models.tiny_folder import build_tiny_wan_folder

    print(f"wrote {build_tiny_wan_folder(args.out, seed=args.seed)}")
    return 0


# ------------------------------------------------------------------------------------------------------ main
HANDLERS = {"demo": cmd_demo, "sample": cmd_sample, "sweep": cmd_sweep, "cache": cmd_cache,
            "synthesize": cmd_synthesize, "export": cmd_export, "tiny-wan": cmd_tiny_wan, "report": cmd_report,
            "reproduce": cmd_reproduce}
ONE_PROCESS = ("demo", "sample", "sweep", "export", "tiny-wan", "report", "reproduce")   # the others run under torchrun too


def _check_launcher(command: str) -> None:
    """A command that runs in one process refuses torchrun's many (each copy would write the same files)."""
    from .train.distributed import launched

    if command in ONE_PROCESS and launched():
        raise UsageError(f"`anystep {command}` runs in one process; start it without torchrun (the training "
                         "commands, cache and synthesize run under it)")


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input or a failed run, printed as one line (exit status 2)."""
    from .data.latent_cache import CacheError
    from .models.folder import ModelFolderError
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteLossError

    return UsageError, CheckpointError, CacheError, ModelFolderError, NonFiniteLossError, FileNotFoundError


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may stand anywhere on a training or demo command line."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # argparse gives its positional list one run of overrides (the first, or none); the rest come back as extras
    takes = hasattr(args, "overrides")
    unknown = [e for e in extras if not (takes and "=" in e and not e.startswith("-"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see anystep {args.command} --help)")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    torch.set_flush_denormal(True)  # subnormal floats made CPU steps 10-30x slower
    try:
        _check_launcher(args.command)
        return HANDLERS.get(args.command, cmd_train)(args)
    except user_errors() as err:
        print(f"anystep {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_flush_denormal(False)  # back to the process default for callers of main()


if __name__ == "__main__":
    sys.exit(main())
