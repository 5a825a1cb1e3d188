"""``anystep``: train any-step video generators with AnyFlow.

    anystep demo                      the whole method on the toy shapes world, in minutes on a CPU
    anystep teacher  [--config P] [key=value ...]     flow-matching teacher (fine-tune)
    anystep stage1   [--config P] [key=value ...]     Stage 1: forward flow-map training
    anystep stage2   [--config P] [key=value ...]     Stage 2: on-policy flow-map distillation (DMD)
    anystep consistency [--config P] [key=value ...]  the consistency-distillation baseline
    anystep sample   CHECKPOINT --steps N             sample videos at any N (causal: --given-frames for I2V/V2V)
    anystep sweep    RUN [RUN ...] --steps 1,2,4,...  metrics vs N: table, plot, video grid

  the real Wan2.1 path (local diffusers folders; nothing is downloaded):
    anystep cache      --model WAN_DIR --videos VIDEOS --out CACHE   videos + captions -> latents + embeddings
    anystep synthesize --model WAN_DIR --prompts FILE --out CACHE    teacher samples -> the same format
    anystep teacher|stage1|stage2 --config wan1.3b_stage1 world.wan.model=WAN_DIR world.wan.data=CACHE
    anystep export     RUN --out DIR                                 an AnyFlowPipeline folder
    anystep tiny-wan   DIR                                           a tiny random Wan2.1 folder (tests, trying)
"""

from __future__ import annotations

import argparse
import os
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


DEMO_SHORT = (800, 300, 800, 300)   # Stage 1, Stage 2, consistency distillation, consistency + DMD
DEMO_FULL = (2400, 600, 2400, 600)


def _budget_text(budget) -> str:
    return ", ".join(f"{n} {s}" for n, s in zip(("Stage 1", "Stage 2", "CD", "CBS+DMD"), budget))


def _parse_budget(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget takes four integers S1,S2,CD,CBS, got {text!r}") from None
    if len(steps) != 4 or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"--budget takes four integers >= 1 (S1,S2,CD,CBS), got {text!r}")
    return steps


def _train_parser(sub, name: str, help_: str, preset: str) -> None:
    p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG + ", ".join(preset_names()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=preset, help=f"a preset name or a YAML file (default: {preset})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the run's newest complete checkpoint (an error when there is none)")
    start.add_argument("--resume-if-present", action="store_true",
                       help="continue from the run's newest complete checkpoint when there is one, else start "
                            "fresh (for restart scripts)")
    start.add_argument("--resume-from", metavar="CHECKPOINT", default=None,
                       help="continue from this checkpoint (a run folder or a step_* folder)")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a train.out_dir that holds a run: its checkpoints, metrics and logs are "
                            "deleted (without this flag or a resume flag, such a folder is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anystep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train any-step video generators with AnyFlow: one set of weights that samples in 1 step "
                    "for a preview and in 32 for the final render.\nEvery command runs on a CPU-sized toy "
                    "world by default.", epilog=__doc__.split("\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="Stage 1 -> Stage 2 -> baselines -> sweep on the shapes world (~8 min on 2 cores)",
                       description="The main job, from the shipped shapes teacher: Stage 1 (forward flow-map "
                                   "training), Stage 2 (on-policy distillation), the two consistency baselines "
                                   "(consistency distillation; consistency backward simulation + DMD), then the "
                                   "sweep N = 1..32 of every student and the teacher's Euler sampler: table, "
                                   "plot and videos. --full runs the longer budgets. Every run starts fresh: "
                                   "running it again replaces the stages' runs (and the sweep) in --out.")
    d.add_argument("--out", default="runs/demo",
                   help="output folder (default: runs/demo); stage runs already in it are started over")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides applied to every stage's config (e.g. train.threads=1)")
    d.add_argument("--full", action="store_true",
                   help=f"longer budgets: {_budget_text(DEMO_FULL)} (about 2.5x the default run)")
    d.add_argument("--budget", type=_parse_budget, default=None, metavar="S1,S2,CD,CBS",
                   help=f"training steps of each stage (default {','.join(map(str, DEMO_SHORT))})")
    d.add_argument("--no-baselines", action="store_true", help="skip the consistency baselines")
    d.add_argument("--sequential", action="store_true",
                   help="train the baselines after AnyFlow in this process (default: the two chains train side "
                        "by side in two processes, each on half the CPU cores, when there are two or more)")
    d.add_argument("--dry-run", action="store_true", help="print the resolved configs and exit")
    d.add_argument("--no-progress", action="store_true")

    _train_parser(sub, "teacher", "train a velocity teacher by flow matching", "shapes_teacher")
    _train_parser(sub, "stage1", "Stage 1: forward flow-map training of the student", "shapes_stage1")
    _train_parser(sub, "stage2", "Stage 2: on-policy flow-map distillation (flow-map backward simulation + "
                                 "DMD against the teacher, a critic, the co-trained Stage-1 loss); "
                                 "stage2.rollout=consistency is the consistency backward-simulation baseline",
                  "shapes_stage2")
    _train_parser(sub, "consistency", "the consistency-distillation baseline: an endpoint map from the "
                                      "teacher's ODE, sampled by predict-x0-then-re-noise", "shapes_consistency")

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
                   help="CFG scale (default: 1 for a student, whose guidance is fused; the run's "
                        "sweep.teacher_guidance, 3, for a teacher)")
    s.add_argument("--out", default="samples/sample", help="output path stem (default samples/sample)")
    s.add_argument("--given-frames", type=int, default=0, metavar="K",
                   help="causal students: condition on the first K real frames (whole chunks; 1 = I2V, more = "
                        "V2V) and generate the rest")

    _real_path_parsers(sub)

    w = sub.add_parser("sweep", help="metrics vs number of steps: table, plot and video grid",
                       description="Sample the student at every N with the same noises and prompts, score with "
                                   "the world's exact judge, and compare with the teacher's Euler sampler.")
    w.add_argument("checkpoint", nargs="+", help="one or more students' run folders or checkpoints (each is "
                                                "sampled its own way: flow map, or consistency for baselines)")
    w.add_argument("--steps", type=_parse_steps, default=None, help="comma-separated N (default 1,2,4,8,16,32)")
    w.add_argument("--teacher", default=None, help="teacher checkpoint for the Euler baseline (default: the "
                                                   "first run's teacher; gmm: the exact teacher)")
    w.add_argument("--num-samples", type=int, default=None, help="clips / samples scored per N (default: the "
                                                                 "run's sweep.num_samples)")
    w.add_argument("--seed", type=int, default=None, help="seed of the noises and prompts (default: the run's "
                                                         "sweep.seed); sweep twice with other seeds to see the "
                                                         "metrics' sampling noise")
    w.add_argument("--out", default=None, help="output folder (default: <run>/sweep)")
    w.add_argument("--no-progress", action="store_true")
    return parser


def _real_path_parsers(sub) -> None:
    c = sub.add_parser("cache", help="encode videos + captions into a latent cache (VAE + UMT5, once)",
                       description="Encode (video, caption) pairs with the model folder's VAE (posterior mean, "
                                   "normalised with the VAE's latents mean/std) and UMT5 text encoder (zero "
                                   "padding), plus the negative-prompt embedding used as the null prompt; "
                                   "sharded safetensors, resumable (run it again to continue). Frames are "
                                   "prepared as the official code does: resampled in time to 16 fps from each "
                                   "video's frame rate (81 frames = ~5 s of motion, whatever the source rate; "
                                   "a source at or below 16 fps gives every frame) and stretched to "
                                   "HEIGHT x WIDTH without crop. --stride N (or --fps 0) takes every N-th frame "
                                   "instead, --resize crop centre-crops. Videos too short for --frames, or "
                                   "without a frame rate in their metadata, are skipped and listed in the "
                                   "cache's index.json. The choices are recorded in the cache: resuming with "
                                   "other ones is refused.")
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
                   help="stretch: resize the whole frame to HEIGHT x WIDTH, aspect not kept (default, "
                        "official); crop: resize the short side and centre-crop")
    c.add_argument("--limit", type=int, default=None, help="cache only the first LIMIT videos")

    s = sub.add_parser("synthesize", help="teacher-generated training data: prompts -> teacher samples",
                       description="Sample the teacher (the folder's Wan transformer, or a teacher run's) with "
                                   "CFG for every prompt and store the latents and embeddings in the cache "
                                   "format (the paper trains on 256K such prompt-video pairs). Resumable.")
    s.add_argument("--model", required=True, help="local Wan2.1 diffusers folder")
    s.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or .json (a list)")
    s.add_argument("--teacher", default=None, help="a teacher run to sample instead of the folder's transformer")
    s.add_argument("--steps", type=int, default=50, help="teacher sampling steps (default 50)")
    s.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5, Wan's)")
    s.add_argument("--seed", type=int, default=0)
    _cache_args(s)

    e = sub.add_parser("export", help="write a trained student as a diffusers AnyFlowPipeline folder",
                       description="The student's EMA weights, LoRA merged (or kept as adapters), with the "
                                   "source folder's VAE, text encoder and tokenizer and "
                                   "FlowMapEulerDiscreteScheduler(shift=5): load it with "
                                   "AnyFlowPipeline.from_pretrained(DIR) and sample at any number of steps.")
    e.add_argument("run", help="a Stage-1 or Stage-2 run (world.name=wan) or one of its checkpoints")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--adapters", action="store_true",
                   help="keep the LoRA as an adapter file beside the base (pipe.load_lora_weights(DIR))")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the transformer for release (default: keep float32)")
    e.add_argument("--shift", type=float, default=5.0, help="the scheduler's time shift (official 5)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    t = sub.add_parser("tiny-wan", help="write a tiny random-weight Wan2.1 T2V folder (offline tests, trying)",
                       description="A Wan2.1 T2V diffusers folder with every part tiny and random: the whole "
                                   "real path (cache, synthesize, train, export) runs on it in seconds.")
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


def cmd_cache(args) -> int:
    from .data.cache import cache_videos
    from .data.video_io import OFFICIAL_FPS
    from .recipes import resolve_device

    fps = args.fps if args.fps is not None else (None if args.stride is not None else OFFICIAL_FPS)
    out = cache_videos(args.model, args.videos, args.out, frames=args.frames, height=args.height,
                       width=args.width, fps=fps, stride=args.stride, resize=args.resize,
                       max_text_len=args.max_text_len,
                       shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                       device=resolve_device(args.device), progress=not args.no_progress, limit=args.limit)
    print(f"cache: {out} (train with world.wan.data={out})")
    return 0


def cmd_synthesize(args) -> int:
    from .data.synthesize import read_prompts, synthesize
    from .recipes import resolve_device, teacher_transformer

    transformer = teacher_transformer(args.teacher, args.model) if args.teacher else None
    out = synthesize(args.model, read_prompts(args.prompts), args.out, steps=args.steps, guidance=args.guidance,
                     frames=args.frames, height=args.height, width=args.width, seed=args.seed,
                     batch_size=args.batch_size, max_text_len=args.max_text_len, shard_size=args.shard_size,
                     dtype=args.dtype, device=resolve_device(args.device), transformer=transformer,
                     progress=not args.no_progress)
    print(f"cache: {out} (train with world.wan.data={out})")
    return 0


def cmd_export(args) -> int:
    import torch

    from .recipes import export_run

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_run(args.run, args.out, adapters=args.adapters, dtype=dtype, overwrite=args.overwrite,
                     shift=args.shift)
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


def cmd_tiny_wan(args) -> int:
    from .models.tiny_folder import build_tiny_wan_folder

    print(f"wrote {build_tiny_wan_folder(args.out, seed=args.seed)}")
    return 0


# ------------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .recipes import train

    cfg = resolve(args.config, args.overrides)
    if args.command != cfg.kind:
        raise ValueError(f"config {args.config!r} is a {cfg.kind!r} config; use `anystep {cfg.kind}`")
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    ckpt = train(cfg, resume=args.resume_from or args.resume, progress=not args.no_progress,
                 resume_if_present=args.resume_if_present, overwrite=args.overwrite)
    print(f"done: checkpoint {ckpt}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .evaluate.sweep import Sampler, sample_batched
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
    default_w = 1.0 if role == "student" else cfg.sweep.teacher_guidance
    name = f"{role} N={args.steps}"
    if args.given_frames:
        if cfg.sampler != "causal" or binding.name != "shapes":
            raise ValueError("--given-frames (I2V / V2V) is for causal students of the shapes world")
        from .causal import sample_causal
        given = binding.world.render(ev.meta)[:, :args.given_frames]   # the prompts' real first frames
        x = sample_causal(model, ev.noise, ev.cond, args.steps, shift=cfg.sweep.shift, given=given)
        name += f", first {args.given_frames} frame(s) given"
    else:
        sampler = Sampler(role, model, default_w if args.guidance is None else args.guidance, cfg.sampler)
        x = sample_batched(sampler, binding.null_cond, ev.noise, ev.cond, args.steps, cfg.sweep.shift,
                           seed=args.seed)
    path = binding.save_picture({name: x}, ev, Path(args.out))
    print(f"wrote {path}" + (" (+ .gif, .png strip)" if path.suffix == ".mp4" else ""))
    return 0


def run_label(cfg, spec: str | None = None) -> str:
    """A sweep row's name: what the run is, and its folder when given."""
    what = {"stage1": "AnyFlow Stage 1", "stage2": "AnyFlow Stage 2", "consistency": "consistency distillation",
            "teacher": "teacher"}[cfg.kind]
    if cfg.kind == "stage2" and cfg.stage2.rollout == "consistency":
        what = "consistency + DMD"
    return f"{what} ({Path(spec).name})" if spec else what


def cmd_sweep(args) -> int:
    from .evaluate.sweep import Sampler, markdown_table, run_sweep
    from .recipes import ancestor_teacher, load_model, resolve_checkpoint
    from .worlds.binding import make_binding

    runs = [(spec, *load_model(spec)) for spec in args.checkpoint]
    cfg = runs[0][2]
    sweep = cfg.sweep
    if args.steps:
        sweep = replace(sweep, steps=args.steps)
    if args.num_samples:
        sweep = replace(sweep, num_samples=args.num_samples)
    if args.seed is not None:
        sweep = replace(sweep, seed=args.seed)
    binding = make_binding(cfg.world)
    w = cfg.stage1.fuse_guidance_scale or 1.0
    samplers = []
    for spec, model, run_cfg, role in runs:
        if run_cfg.world != cfg.world:
            raise ValueError(f"{spec} was trained in another world than {args.checkpoint[0]}; sweep them apart")
        guidance = sweep.student_guidance if role == "student" else sweep.teacher_guidance
        samplers.append(Sampler(run_label(run_cfg, spec) if len(runs) > 1 else role, model, guidance,
                                run_cfg.sampler))
    if sweep.teacher and binding.reference_teacher() is not None:
        samplers.append(Sampler("teacher (exact) Euler", binding.reference_teacher(), sweep.teacher_guidance,
                                "euler"))
    elif sweep.teacher and runs[0][3] == "student":
        teacher, _, _ = load_model(args.teacher or ancestor_teacher(args.checkpoint[0]), role="teacher")
        samplers.append(Sampler("teacher Euler", teacher, sweep.teacher_guidance, "euler"))
    run_dir = resolve_checkpoint(args.checkpoint[0])
    out = Path(args.out) if args.out else (run_dir.parent.parent if run_dir.parent.name == "checkpoints"
                                           else run_dir) / "sweep"
    rows = run_sweep(samplers, binding, sweep, out, eval_guidance=w, progress=not args.no_progress)
    print(markdown_table(rows))
    grid = "grid.png" if binding.name == "gmm" else "grid.mp4"
    print(f"table: {out / 'sweep.md'}  plot: {out / 'sweep.png'}  samples: {out / grid}")
    return 0


def _train_chain(stages: list, total: int, threads: int | None, progress: bool) -> None:
    """Train ``[(index, (title, cfg)), ...]`` in order (each stage starts from the one before it)."""
    import torch

    from .recipes import train

    torch.set_flush_denormal(True)  # as main() does: a spawned process starts afresh
    if threads:
        torch.set_num_threads(threads)  # a stage's own train.threads, if set, wins (train() applies it)
    for i, (title, cfg) in stages:
        t0 = time.time()
        print(f"[{i}/{total}] {title}: {cfg.train.steps} steps", flush=True)
        ckpt = train(cfg, progress=progress, overwrite=True)   # the demo starts every stage fresh
        print(f"      [{i}/{total}] done in {time.time() - t0:.0f} s: {ckpt}", flush=True)


def cmd_demo(args) -> int:
    from .evaluate.sweep import Sampler, markdown_table, run_sweep
    from .recipes import load_model
    from .worlds.binding import make_binding

    out = Path(args.out)
    budget = args.budget or (DEMO_FULL if args.full else DEMO_SHORT)
    s1, s2, cd, cbs = out / "stage1", out / "stage2", out / "consistency", out / "consistency_dmd"
    stages = [("Stage 1 (forward flow-map training) from the shipped teacher", "shapes_stage1", s1, None, budget[0]),
              ("Stage 2 (on-policy flow-map distillation) from Stage 1", "shapes_stage2", s2, s1, budget[1])]
    if not args.no_baselines:
        stages += [("baseline: consistency distillation from the shipped teacher", "shapes_consistency", cd,
                    None, budget[2]),
                   ("baseline: consistency backward simulation + DMD", "shapes_cbs", cbs, cd, budget[3])]
    configs = []
    for title, preset, run, init, steps in stages:
        extra = [f"model.init={init}"] if init else []
        configs.append((title, resolve(preset, [f"train.out_dir={run}", f"train.steps={steps}", *extra,
                                                *args.overrides])))
    if args.dry_run:
        for title, cfg in configs:
            print(f"# {title}\n{to_yaml(cfg)}")
        return 0
    start = time.time()
    total = len(configs) + 1
    chains = [list(enumerate(configs[:2], 1)), list(enumerate(configs[2:], 3))]
    cores = os.cpu_count() or 1
    if args.sequential or not chains[1] or cores < 2:
        _train_chain(chains[0] + chains[1], total, None, progress=not args.no_progress)
    else:
        # AnyFlow (Stage 1 -> Stage 2) here, the baselines (CD -> CBS+DMD) in a second process: the two chains
        # are independent, and two one-thread processes beat one two-thread process on these tiny models.
        import multiprocessing as mp
        threads = max(1, cores // 2)
        print(f"training the AnyFlow chain here and the baselines in a second process ({threads} thread(s) each; "
              f"--sequential for one process)")
        child = mp.get_context("spawn").Process(target=_train_chain, args=(chains[1], total, threads, False))
        child.start()
        try:
            _train_chain(chains[0], total, threads, progress=not args.no_progress)
        except BaseException:
            child.terminate()  # do not leave the baselines training after AnyFlow's chain failed
            raise
        finally:
            child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the baselines' process failed (exit code {child.exitcode}); see its message above")
    cfg = configs[0][1]
    print(f"[{total}/{total}] sweep N =", ",".join(map(str, cfg.sweep.steps)))
    samplers = []
    for _, run_cfg in configs:
        model, _, _ = load_model(run_cfg.train.out_dir)
        samplers.append(Sampler(run_label(run_cfg), model, 1.0, run_cfg.sampler))
    teacher, _, _ = load_model(cfg.model.init, role="teacher")
    samplers.append(Sampler("teacher Euler", teacher, cfg.sweep.teacher_guidance, "euler"))
    binding = make_binding(cfg.world)
    w = cfg.stage1.fuse_guidance_scale or 1.0
    rows = run_sweep(samplers, binding, cfg.sweep, out / "sweep", eval_guidance=w, progress=not args.no_progress)
    print()
    print(markdown_table(rows))
    print(f"total time {time.time() - start:.0f} s")
    print(f"table: {out / 'sweep' / 'sweep.md'}\nplot:  {out / 'sweep' / 'sweep.png'}\n"
          f"videos: {out / 'sweep' / 'grid.mp4'} (rows: sampler and N; also grid.gif, grid.png)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"demo": cmd_demo, "teacher": cmd_train, "stage1": cmd_train, "stage2": cmd_train,
                "consistency": cmd_train, "sample": cmd_sample, "sweep": cmd_sweep, "cache": cmd_cache,
                "synthesize": cmd_synthesize, "export": cmd_export, "tiny-wan": cmd_tiny_wan}
    import torch
    torch.set_flush_denormal(True)  # subnormal floats made CPU steps 10-30x slower
    from .data.shards import CacheError
    from .train.checkpoint import CheckpointError
    from .train.loop import NonFiniteLossError
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError, CacheError) as err:
        print(f"anystep {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_flush_denormal(False)  # back to the process default for callers of main()


if __name__ == "__main__":
    sys.exit(main())
