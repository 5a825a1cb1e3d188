"""The any-step speed-up as a user feels it, measured in one run: diffusers' ``AnyFlowPipeline`` at N = 1, 2, 4, 8
steps (guidance fused into the student: one transformer call per step) against ``WanPipeline`` at 50 steps with
CFG 5 (two calls per step: 100 calls), the same transformer size, the denoising loop alone and end to end with
the VAE decode.

    python benchmarks/anystep_speedup.py                             # Wan2.1-1.3B sized, 81x480x832, on cuda
    python benchmarks/anystep_speedup.py --size tiny --device cpu    # CPU smoke run (seconds; the tests run it)

Setup: random weights (the cost does not depend on them), made on the device: a ``WanTransformer3DModel`` of the
Wan2.1 config for ``WanPipeline`` (``UniPCMultistepScheduler`` with flow shift 3, Wan's 480p choice) and an
``AnyFlowTransformer3DModel`` of the same config (plus its delta embedder) for ``AnyFlowPipeline``
(``FlowMapEulerDiscreteScheduler(shift=5)``), both in bf16 on a GPU (fp32 on the CPU); the Wan VAE
(``AutoencoderKLWan``, the real architecture for 1.3B / 14B, a tiny one for ``--size tiny``) in fp32 as diffusers'
Wan examples run it. Prompts are given as random UMT5-sized embeddings, so the text encoder is not part of the
measured time (it runs once per prompt in both pipelines). Timing: median of ``--repeats`` (default 1: the
50-step CFG baseline alone is ~100 transformer calls) after a one-step warm-up of the same call,
``torch.cuda.synchronize`` around each. "denoise" = ``output_type="latent"``; "end to end" adds the decode.
The headline is the 4-step ratio: the paper's 4 calls against 100.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_throughput import WAN_CONFIGS, default_dtype, sync

from anystep.models.wan import _SHARED_KEYS

SIZES = {"1.3b": (81, 480, 832), "14b": (81, 480, 832), "tiny": (5, 32, 32)}
ANYFLOW_STEPS = (1, 2, 4, 8)
WAN_STEPS, WAN_CFG = 50, 5.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3b", help="transformer config (default 1.3b)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--video", default=None, help="FRAMESxHEIGHTxWIDTH (default: 81x480x832; tiny 5x32x32)")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats (median; default 1)")
    ap.add_argument("--wan-steps", type=int, default=WAN_STEPS, help="WanPipeline steps (default 50)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.wan_steps < 1:
        ap.error("--repeats and --wan-steps must be >= 1")
    args.video = tuple(int(v) for v in args.video.split("x")) if args.video else SIZES[args.size]
    return args


def pipelines(size: str, device: torch.device) -> tuple[Any, Any]:
    """(WanPipeline, AnyFlowPipeline) over random transformers of one config and one random VAE."""
    from diffusers import (
        AnyFlowPipeline,
        AnyFlowTransformer3DModel,
        AutoencoderKLWan,
        FlowMapEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    cfg = dict(WAN_CONFIGS[size])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device), default_dtype(dtype):
        wan = WanTransformer3DModel(**cfg).eval()
        anyflow = AnyFlowTransformer3DModel(**{k: cfg[k] for k in _SHARED_KEYS}, gate_value=0.25,
                                            deltatime_type="r").eval()
    with torch.device(device):
        vae = (AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True]) if size == "tiny" else AutoencoderKLWan()).eval()
    wan_pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=wan,
                           scheduler=UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction",
                                                             use_flow_sigmas=True))
    anyflow_pipe = AnyFlowPipeline(tokenizer=None, text_encoder=None, transformer=anyflow, vae=vae,
                                   scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    for pipe in (wan_pipe, anyflow_pipe):
        pipe.set_progress_bar_config(disable=True)
    return wan_pipe, anyflow_pipe


def timed(run: Callable[[], Any], warm_up: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of ``run`` after one ``warm_up`` call."""
    warm_up()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wan_pipe, anyflow_pipe = pipelines(args.size, device)
    frames, height, width = args.video
    text_dim = WAN_CONFIGS[args.size]["text_dim"]
    g = torch.Generator().manual_seed(0)
    dtype = wan_pipe.transformer.dtype
    embeds, negative = (torch.randn(1, 512, text_dim, generator=g).to(device, dtype) for _ in range(2))
    common = {"height": height, "width": width, "num_frames": frames, "prompt_embeds": embeds}
    runs = [("WanPipeline", args.wan_steps, 2, lambda out, n: wan_pipe(
                **common, negative_prompt_embeds=negative, num_inference_steps=n, guidance_scale=WAN_CFG,
                output_type=out, generator=torch.Generator().manual_seed(0)))]
    runs += [("AnyFlowPipeline", n, 1, lambda out, n: anyflow_pipe(
                **common, num_inference_steps=n, guidance_scale=1.0, output_type=out,
                generator=torch.Generator().manual_seed(0))) for n in ANYFLOW_STEPS]
    rows = []
    with torch.no_grad():
        for name, steps, calls, call in runs:
            denoise, total = (timed(partial(call, out, steps), partial(call, out, 1), device, args.repeats)
                              for out in ("latent", "np"))
            rows.append({"pipeline": name, "steps": steps, "transformer calls": steps * calls,
                         "denoise (s)": denoise, "end to end (s)": total})
    base = rows[0]
    for row in rows:
        row["speed-up, denoise"] = base["denoise (s)"] / row["denoise (s)"]
        row["speed-up, end to end"] = base["end to end (s)"] / row["end to end (s)"]
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; prints the table and returns its rows."""
    args = parse_args(argv)
    rows = measure(args)
    keys = list(rows[0])
    print(f"\n{args.size} transformer, {'x'.join(map(str, args.video))} video, median of {args.repeats}\n")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "video": args.video, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
