"""The GPU check: anystep's real path run end to end on one device, then how fast it trains (issue 15), one JSON.

    bash benchmarks/gpu_check.sh                         # on a GPU machine (installs carried wheels if needed)
    bash benchmarks/gpu_check.sh --parts all-levers,speedup,causal,big --out gpu_check_2.json   # what the budget skipped
    python benchmarks/gpu_table.py gpu_check.json gpu_check_2.json                       # the README's tables
    python benchmarks/gpu_check.py --device cpu --throughput-size tiny    # the CPU mode the tests run

The parts, in this order (``--parts`` chooses), each step recorded as ``ok`` (or its error, and the check goes
on to the next):

``chains``      the tiny bidirectional chain on a random Wan2.1 folder (``anystep tiny-wan``), everything on
                ``--device``: ``anystep cache`` of synthetic clips, teacher fine-tune (LoRA, bf16 autocast) ->
                Stage 1 -> Stage 2 (LoRA roles on one frozen base) -> ``anystep export`` -> diffusers'
                ``AnyFlowPipeline`` at 1 and 4 steps; the causal chain (Stage 1 -> Stage 2 -> export ->
                ``AnyFlowFARPipeline``, T2V and I2V); after each, **placement**: every trainable parameter and
                optimizer state on the device (the first GPU run crashed on a tensor made on the CPU).
``throughput``  ``wan_throughput.py --size 1.3b --profile``: random Wan2.1-1.3B weights at 81x480x832, no lever:
                forward, Stage-1 and Stage-2 step time, peak memory, MFU, first-step losses, and one Stage-1 and
                one Stage-2 step profiled (``step_profile.py``: time per phase x operator class).
``levers``      Stage 1 with each lever alone (``--levers`` chooses among attention, fused, compile,
                checkpointing): the CUDA attention backends (flash, cuDNN, memory-efficient), fused AdamW, compiled
                blocks, checkpointing that keeps attention, checkpointing half the blocks; each row's first-step
                loss beside the baseline's is the numerics check (same seed, same batch).
``all-levers``  Stage 1 and Stage 2 with every lever that made Stage 1 faster alone at the baseline's numerics
                (first-step loss to bf16 tolerance, relative 2e-2), conflicts settled by measurement
                (:func:`best_levers`): the choice of the CUDA defaults, made on the device.
``speedup``     ``anystep_speedup.py``: ``AnyFlowPipeline`` at 1/2/4/8 steps against ``WanPipeline`` at 50 steps
                x CFG 5, denoising loop and end to end.
``causal``      the causal (FAR) 1.3B student's Stage 1 (teacher forcing) and Stage 2 (KV-cache self-rollout) at
                full size on compiled flex attention; Stage 1 again on eager flex (before/after).
``big``         the 14B model on one device with every lever on: Stage 1 and Stage 2 time and peak memory
                (smaller sizes where 81x480x832 does not fit).

``--budget`` (default 480 s): a part whose estimated H200 time (``PARTS``) no longer fits is skipped and listed
under "skipped" in the JSON with the command that runs it; the first call fits the chains, the baseline with its
profile and the levers into about 8 minutes, a second call (``--parts all-levers,speedup,causal,big``) the rest.
``gpu_table.py`` makes the README's tables from one or more of these JSONs. The CPU mode (``--device cpu
--throughput-size tiny``) runs the same code in a few minutes and is part of the test suite, so the script cannot
rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
TINY = ["model.lora_rank=4", "model.lora_alpha=4", "train.batch_size=2", "train.log_every=1",
        "train.checkpoint_every=1000"]
# teacher and Stage-1 runs (one optimizer per trained role); Stage 2's (official) has no warm-up
TEACHER_WARMUP, STUDENT_WARMUP = ["optim.teacher.warmup_steps=1"], ["optim.student.warmup_steps=1"]


class Check:
    """The results, written to ``path`` after every part (a crash later keeps what was measured)."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = path, device
        self.result: dict[str, Any] = {"device": _device_name(device), "versions": _versions(),
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": []}

    def part(self, name: str, run: Callable[[], dict[str, Any] | None]) -> bool:
        print(f"[gpu_check] {name} ...", flush=True)
        start = time.time()
        entry: dict[str, Any] = {"name": name}
        try:
            entry.update(run() or {})
            entry["ok"] = True
        except Exception as err:  # noqa: BLE001 (recorded, and the check goes on)
            entry.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        entry["seconds"] = round(time.time() - start, 2)
        self.result["parts"].append(entry)
        print(f"[gpu_check] {name}: {'ok' if entry['ok'] else 'FAILED ' + entry['error']} "
              f"({entry['seconds']} s)", flush=True)
        self.write()
        return entry["ok"]

    def write(self) -> None:
        self.result["ok"] = all(p["ok"] for p in self.result["parts"])
        self.path.write_text(json.dumps(self.result, indent=1) + "\n")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "diffusers": diffusers.__version__, "peft": peft.__version__, "transformers": transformers.__version__}


def _anystep(*argv: Any) -> None:
    """``anystep ARGV`` in this process; a non-zero exit is an error carrying what it printed."""
    from anystep.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        quiet = [] if argv[0] in ("export", "tiny-wan") else ["--no-progress"]
        code = main([str(a) for a in argv] + quiet)
    if code != 0:
        raise RuntimeError(f"anystep {argv[0]} exited {code}: {err.getvalue().strip()[-2000:]}")


def _placement(run: Path, device: torch.device) -> dict[str, Any]:
    """Rebuild a finished run's trainer on ``device`` (from its config), resume it, and list any trainable
    parameter or optimizer state that is not on the device."""
    from anystep.config import resolve
    from anystep.recipes import build_trainer

    cfg = resolve(str(run / "config.yaml"), [f"train.device={device}"])
    trainer = build_trainer(cfg, progress=False)
    trainer.resume()
    wrong = [f"{role}:{n}" for role, m in trainer.method.roles.items() for n, p in m.named_parameters()
             if p.requires_grad and p.device.type != device.type]
    for role, opt in trainer.optimizers.items():
        wrong += [f"{role}:optimizer" for state in opt.state.values() for v in state.values()
                  if torch.is_tensor(v) and v.ndim > 0 and v.device.type != device.type]
    if wrong:
        raise AssertionError(f"not on {device}: {wrong[:8]}")
    return {"trainable_tensors_on_device": sum(1 for m in trainer.method.roles.values() for p in m.parameters()
                                               if p.requires_grad)}


def _pipeline_runs(pipe, device: torch.device, steps=(1, 4), **kwargs) -> dict[str, Any]:
    pipe.to(device)
    out = {}
    for n in steps:
        start = time.time()
        video = pipe("a red block moving right", height=32, width=32, num_inference_steps=n, output_type="np",
                     generator=torch.Generator().manual_seed(0), **kwargs).frames
        video = np.asarray(video)
        if not np.isfinite(video).all():
            raise AssertionError(f"{type(pipe).__name__} at {n} steps gave non-finite frames")
        out[f"N={n}"] = {"shape": list(video.shape), "seconds": round(time.time() - start, 3),
                         "mean": float(video.mean())}
    return out


def bidirectional_chain(root: Path, device: torch.device, check: Check) -> None:
    from anystep.models.tiny_folder import write_tiny_clips

    world = [f"world.wan.model={root / 'wan'}", f"world.wan.data={root / 'cache'}", f"train.device={device}"]
    runs = {k: root / "runs" / k for k in ("teacher", "stage1", "stage2")}
    check.part("tiny Wan folder + cache", lambda: _anystep("tiny-wan", root / "wan") or _anystep(
        "cache", "--model", root / "wan", "--videos", write_tiny_clips(root / "clips"), "--out", root / "cache",
        "--frames", 17, "--height", 32, "--width", 32, "--dtype", "float32", "--device", device))
    check.part("teacher fine-tune (LoRA, bf16)", lambda: _anystep(
        "teacher", "--config", "wan1.3b_teacher", *world, *TINY, *TEACHER_WARMUP, "train.steps=2",
        f"train.out_dir={runs['teacher']}"))
    check.part("Stage 1 (LoRA, bf16 base)", lambda: _anystep(
        "stage1", "--config", "wan1.3b_stage1", *world, *TINY, *STUDENT_WARMUP, "train.steps=2",
        f"train.out_dir={runs['stage1']}"))
    check.part("Stage 2 (LoRA roles on one base)", lambda: _anystep(
        "stage2", "--config", "wan1.3b_stage2", *world, *TINY, "train.steps=2", "stage2.rollout_steps=[2,4]",
        f"model.init={runs['stage1']}", f"stage2.teacher={runs['teacher']}", f"train.out_dir={runs['stage2']}"))
    check.part("placement after resume (Stage 2)", lambda: _placement(runs["stage2"], device))
    check.part("export", lambda: _anystep("export", runs["stage2"], "--out", root / "export"))

    def pipeline():
        from diffusers import AnyFlowPipeline
        return _pipeline_runs(AnyFlowPipeline.from_pretrained(root / "export"), device, num_frames=17)

    check.part("AnyFlowPipeline at 1 and 4 steps", pipeline)


def causal_chain(root: Path, device: torch.device, check: Check) -> None:
    common = [f"world.wan.model={root / 'wan'}", f"world.wan.data={root / 'cache'}", f"train.device={device}", *TINY]
    s1, s2 = root / "runs" / "far_stage1", root / "runs" / "far_stage2"
    check.part("causal Stage 1", lambda: _anystep(
        "stage1", "--config", "wanfar1.3b_stage1", *common, "model.causal.chunk_partition=[1,1,1,2]",
        *STUDENT_WARMUP, "train.steps=2", f"train.out_dir={s1}"))
    check.part("causal Stage 2", lambda: _anystep(
        "stage2", "--config", "wanfar1.3b_stage2", *common, "train.steps=2", "stage2.teacher=null",
        "stage2.rollout_steps=[2]", f"model.init={s1}", f"train.out_dir={s2}"))
    check.part("placement after resume (causal Stage 2)", lambda: _placement(s2, device))
    check.part("causal export", lambda: _anystep("export", s2, "--out", root / "far_export"))

    def pipeline():
        from diffusers import AnyFlowFARPipeline

        from anystep.models.far import set_causal_attention

        pipe = AnyFlowFARPipeline.from_pretrained(root / "far_export")
        set_causal_attention(pipe.transformer, "auto")   # flex on CUDA, dense on the CPU
        first = torch.rand(1, 1, 3, 32, 32)
        return {"T2V": _pipeline_runs(pipe, device, num_frames=17, chunk_partition=[1, 1, 1, 2]),
                "I2V": _pipeline_runs(pipe, device, num_frames=17, chunk_partition=[1, 1, 1, 2],
                                      video=first.to(device))}

    check.part("AnyFlowFARPipeline at 1 and 4 steps (T2V, I2V)", pipeline)


# --------------------------------------------------------------------------------------------------
# the speed parts (issue 15): throughput with its profile, each lever on and off, causal, 14B, any-step speed-up
# --------------------------------------------------------------------------------------------------
def _module(name: str):
    """A benchmark script of this folder as a module (loaded once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _throughput(ctx: Context, *extra: str, size: str | None = None) -> list[dict[str, Any]]:
    """``wan_throughput.py`` on the device with ``extra`` arguments; its rows."""
    argv = ["--size", size or ctx.size, "--device", str(ctx.device), "--repeats", str(ctx.repeats), *extra]
    return _module("wan_throughput").main(argv)


def lever_sets(device: torch.device) -> dict[str, list[str]]:
    """Each speed lever alone, as ``--lever`` settings of wan_throughput (the training config keys). The attention
    backends are the CUDA ones (flash, cuDNN, memory-efficient); on the CPU, where none runs, the math one stands
    in so that the CPU mode runs the same code."""
    backends = (("flash", "_native_flash"), ("cuDNN", "_native_cudnn"), ("efficient", "_native_efficient")) \
        if device.type == "cuda" else (("math", "_native_math"),)
    sets = {f"attention {label}": [f"train.attention_backend={name}"] for label, name in backends}
    sets.update({"fused AdamW": ["optim.fused=true"], "compiled blocks": ["train.compile=blocks"],
                 "checkpointing keeps attention": ["train.checkpoint_save=attention"],
                 "checkpointing half the blocks": ["train.checkpoint_fraction=0.5"]})
    return sets


_KINDS = {"train.attention_backend": "attention", "optim.fused": "fused", "train.compile": "compile",
          "train.checkpoint_save": "checkpointing", "train.checkpoint_fraction": "checkpointing"}


def _lever_kind(settings: list[str]) -> str:
    """The --levers name of a lever setting: attention, fused, compile, checkpointing."""
    return _KINDS[settings[0].split("=")[0]]


@dataclass
class Context:
    """What the parts share: the device, the model size of the throughput parts, repeats, and what earlier parts
    found (the fastest exact attention backend, for the all-levers rows)."""

    device: torch.device
    size: str
    repeats: int
    root: Path
    check: Check
    levers: tuple[str, ...] = ()       # the lever kinds to pull (--levers)
    found: dict[str, Any] = field(default_factory=dict)

    @property
    def big(self) -> str:
        return "tiny" if self.size == "tiny" else "14b"


def _row(rows: list[dict[str, Any]], metric: str) -> float | None:
    return next((r["value"] for r in rows if r["metric"] == metric), None)


def part_chains(ctx: Context) -> None:
    bidirectional_chain(ctx.root, ctx.device, ctx.check)
    causal_chain(ctx.root, ctx.device, ctx.check)


def part_throughput(ctx: Context) -> None:
    """The baseline (no lever): forward, Stage 1, Stage 2, and the profile of one Stage-1 and one Stage-2 step."""
    def run():
        folder = ctx.root / "profile"
        rows = _throughput(ctx, "--profile", str(folder))
        ctx.found["baseline"] = rows
        return {"size": ctx.size, "rows": rows, "profile": json.loads((folder / "profile.json").read_text())}
    ctx.check.part(f"throughput ({ctx.size})", run)


def part_levers(ctx: Context) -> None:
    """Stage 1 with each lever alone (its step time, MFU, peak memory and first-step loss beside the baseline's)."""
    for name, settings in lever_sets(ctx.device).items():
        if _lever_kind(settings) not in ctx.levers:
            continue

        def run(settings=settings):
            rows = _throughput(ctx, "--skip", "forward,stage2", *(f"--lever={s}" for s in settings))
            return {"levers": settings, "rows": rows}
        if ctx.check.part(f"lever: {name} ({ctx.size}, Stage 1)", run):
            rows = ctx.check.result["parts"][-1]["rows"]
            ctx.found.setdefault("levers", []).append((_row(rows, "Stage 1 step (s)"), settings[0], rows))


def best_levers(ctx: Context) -> list[str]:
    """Every lever that made Stage 1 faster alone, at the baseline's numerics (its first-step loss to bf16
    tolerance, relative 2e-2), chosen by measurement: of the attention backends the fastest; of compiled blocks
    and checkpointing that keeps attention (not run together) the faster; keeping attention only with a fused
    SDPA backend (what it keeps). Every lever measured in the levers part when there is no baseline to beat."""
    base = ctx.found.get("baseline", [])
    base_time, base_loss = _row(base, "Stage 1 step (s)"), _row(base, "Stage 1 first-step loss/stage1")

    def good(t, rows) -> bool:
        loss = _row(rows, "Stage 1 first-step loss/stage1")
        exact = base_loss is None or (loss is not None and abs(loss - base_loss) <= 2e-2 * abs(base_loss))
        return t is not None and exact and (base_time is None or t < base_time)

    kept = sorted((t, s) for t, s, rows in ctx.found.get("levers", []) if good(t, rows))
    chosen: dict[str, tuple[float, str]] = {}
    for t, setting in kept:                       # fastest first: one setting per config key
        chosen.setdefault(setting.split("=")[0], (t, setting))
    save, compiled = chosen.get("train.checkpoint_save"), chosen.get("train.compile")
    if save and compiled:
        chosen.pop("train.compile" if save[0] <= compiled[0] else "train.checkpoint_save")
    backend = chosen.get("train.attention_backend", (0, "train.attention_backend=auto"))[1].split("=")[1]
    from anystep.build import FUSED_SDPA_BACKENDS
    if "train.checkpoint_save" in chosen and backend not in FUSED_SDPA_BACKENDS:
        chosen.pop("train.checkpoint_save")
    return [setting for _, setting in sorted(chosen.values(), key=lambda v: list(_KINDS).index(v[1].split("=")[0]))]


def part_all_levers(ctx: Context) -> None:
    def run():
        levers = best_levers(ctx)
        return {"levers": levers, "rows": _throughput(ctx, "--skip", "forward", *(f"--lever={s}" for s in levers))}
    ctx.check.part(f"all levers ({ctx.size}, Stage 1 and Stage 2)", run)


def part_causal(ctx: Context) -> None:
    """The causal (FAR) student's Stage 1 (teacher forcing) and Stage 2 (KV-cache self-rollout) at full size on
    compiled flex attention, then Stage 1 on eager flex (``model.causal.flex_compile=false``: what diffusers runs)
    for the before/after."""
    def run(extra: tuple[str, ...] = ()):
        skip = "forward,stage1,stage2" + (",causal-stage2" if extra else "")
        return {"levers": list(extra), "rows": _throughput(ctx, "--causal", "--skip", skip,
                                                           *(f"--lever={s}" for s in extra))}
    ctx.check.part(f"causal ({ctx.size}, compiled flex)", run)
    ctx.check.part(f"causal ({ctx.size}, eager flex, Stage 1)", lambda: run(("model.causal.flex_compile=false",)))


def part_speedup(ctx: Context) -> None:
    def run():
        argv = ["--size", ctx.size, "--device", str(ctx.device)]
        return {"size": ctx.size, "rows": _module("anystep_speedup").main(argv)}
    ctx.check.part(f"any-step speed-up ({ctx.size})", run)


def part_big(ctx: Context) -> None:
    """The 14B model on one device (LoRA on a bf16 frozen base), every lever on: Stage 1 and Stage 2 time and peak
    memory, falling back to fewer frames where a size does not fit."""
    def run():
        levers = best_levers(ctx)
        rows = _throughput(ctx, "--skip", "forward", *(f"--lever={s}" for s in levers), size=ctx.big)
        return {"size": ctx.big, "levers": levers, "rows": rows}
    ctx.check.part(f"throughput ({ctx.big}, all levers)", run)


LEVER_KINDS = ("attention", "fused", "compile", "checkpointing")


@dataclass(frozen=True)
class Part:
    run: Callable[[Context], None]
    h200_s: float         # estimated seconds on one H200 (from the measured 1.3B step times), for --budget
    what: str


# The parts in the order they run, the most telling first. The estimates come from the measured 1.3B rows before
# any lever (forward 0.9 s, Stage 1 5.3 s/step, Stage 2 47.5 s/step) plus model building and compilation.
PARTS: dict[str, Part] = {
    "chains": Part(part_chains, 90, "the tiny bidirectional and causal chains, placement, the pipelines"),
    "throughput": Part(part_throughput, 170, "1.3B baseline: forward, Stage 1, Stage 2, each step profiled"),
    "levers": Part(part_levers, 170, "Stage 1 with each lever alone (attention backends, fused AdamW, compile, "
                                     "checkpointing)"),
    "all-levers": Part(part_all_levers, 120, "Stage 1 and Stage 2 with every lever that helped alone"),
    "speedup": Part(part_speedup, 150, "AnyFlowPipeline at 1/2/4/8 steps vs WanPipeline 50 steps x CFG"),
    "causal": Part(part_causal, 200, "causal (FAR) 1.3B Stage 1 and Stage 2, compiled flex vs eager"),
    "big": Part(part_big, 300, "14B Stage 1 and Stage 2 on one device, every lever on"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON with every part's result")
    ap.add_argument("--throughput-size", default="1.3b", choices=("1.3b", "tiny"),
                    help="model size of the speed parts (tiny: the CPU mode; the 'big' part is then tiny too)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts to run, in this order: {', '.join(PARTS)} (default: all)")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds: a part whose H200 estimate no longer fits in what is left is skipped and "
                         "recorded as such (run it later with --parts); 0 = no budget")
    ap.add_argument("--levers", default=",".join(LEVER_KINDS),
                    help=f"the levers to pull, comma-separated among {', '.join(LEVER_KINDS)} (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats of the throughput rows (median)")
    ap.add_argument("--workdir", default=None, help="where the tiny runs go (default: a temporary folder)")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; the parts are {list(PARTS)}")
    args.levers = tuple(v.strip() for v in args.levers.split(",") if v.strip())
    if set(args.levers) - set(LEVER_KINDS):
        ap.error(f"--levers takes {', '.join(LEVER_KINDS)}; got {', '.join(args.levers)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but CUDA is not available here (use --device cpu for the "
                         "CPU mode)")
    check = Check(Path(args.out), device)
    check.result["budget_s"] = args.budget
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(device, args.throughput_size, args.repeats, Path(args.workdir or tmp), check, args.levers)
        for name in (n for n in PARTS if n in args.parts):
            left = args.budget - (time.time() - start)
            if args.budget and device.type == "cuda" and PARTS[name].h200_s > left:
                check.result.setdefault("skipped", []).append(
                    f"{name} ({PARTS[name].what}): estimated {PARTS[name].h200_s:.0f} s, {max(left, 0):.0f} s of "
                    f"the budget left; run it with --parts {name}")
                print(f"[gpu_check] {name}: skipped (budget)", flush=True)
                continue
            PARTS[name].run(ctx)
    check.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    check.write()
    print(f"[gpu_check] {'all parts ok' if check.result['ok'] else 'SOME PARTS FAILED'}: {args.out}")
    return check.result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
