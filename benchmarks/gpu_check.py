"""The GPU check: anystep's real path run end to end on one device, then the Wan2.1-1.3B throughput, one JSON.

    bash benchmarks/gpu_check.sh                         # on a GPU machine (installs carried wheels if needed)
    python benchmarks/gpu_check.py --device cuda --out gpu_check.json
    python benchmarks/gpu_check.py --device cpu --throughput-size tiny    # the CPU mode the tests run

What it runs, each part timed and recorded as ``ok`` (or its error, and the check goes on to the next part):

1. **bidirectional chain** on a tiny random Wan2.1 folder (``anystep tiny-wan``), everything on ``--device``:
   ``anystep cache`` of a few synthetic clips, teacher fine-tune (LoRA, bf16 autocast) -> Stage 1 -> Stage 2
   (LoRA roles on one frozen base) -> ``anystep export`` -> diffusers' ``AnyFlowPipeline`` at 1 and 4 steps;
2. **causal chain**: causal Stage 1 -> Stage 2 -> export -> ``AnyFlowFARPipeline`` (T2V and I2V) at 1 and 4
   steps;
3. **placement**: after training, every trainable parameter and every optimizer state of each run's roles is
   on the device (the first GPU run crashed on a tensor made on the CPU);
4. **throughput**: ``benchmarks/wan_throughput.py --size 1.3b`` (random Wan2.1-1.3B weights at 81x480x832:
   forward, Stage-1 and Stage-2 step time, peak memory, MFU), its rows copied into the JSON.

On one H200 the whole check is meant to finish in under 8 minutes (the throughput part is most of it). The
CPU mode (``--device cpu --throughput-size tiny``) runs the same code in about a minute and is part of the
test suite, so the script cannot rot between GPU sessions.
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


def throughput(size: str, device: torch.device, repeats: int) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("wan_throughput", HERE / "wan_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = module.main(["--size", size, "--device", str(device), "--repeats", str(repeats)])
    return {"size": size, "rows": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON with every part's result")
    ap.add_argument("--throughput-size", default="1.3b", help="wan_throughput --size (1.3b, 14b, tiny); "
                                                               "'none' skips the throughput part")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of the throughput part (median)")
    ap.add_argument("--workdir", default=None, help="where the tiny runs go (default: a temporary folder)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but CUDA is not available here (use --device cpu for the "
                         "CPU mode)")
    check = Check(Path(args.out), device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        bidirectional_chain(root, device, check)
        causal_chain(root, device, check)
    if args.throughput_size != "none":
        check.part(f"throughput ({args.throughput_size})",
                   lambda: throughput(args.throughput_size, device, args.repeats))
    check.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    check.write()
    print(f"[gpu_check] {'all parts ok' if check.result['ok'] else 'SOME PARTS FAILED'}: {args.out}")
    return check.result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
