"""Smoke test of benchmarks/wan_throughput.py: its tiny CPU run, its FLOP formula and its OOM fallback."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("wan_throughput", BENCHMARKS / "wan_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_tiny_cpu_run_prints_forward_stage1_stage2_rows(bench, capsys, tmp_path):
    out_json = tmp_path / "rows.json"
    rows = bench.main(["--size", "tiny", "--device", "cpu", "--repeats", "1", "--json", str(out_json)])
    out = capsys.readouterr().out
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] != "device":
            table[cells[2]] = cells[3]
    for metric in ("forward student, no grad (s)", "forward teacher, no grad (s)", "Stage 1 step (s)",
                   "Stage 2 step (s)"):
        assert float(table[metric]) > 0, metric
    assert table["Stage 1 MFU (%)"] == "n/a" and table["Stage 2 peak memory (GiB)"] == "n/a"   # CPU
    values = {r["metric"]: r["value"] for r in rows}
    assert values["Stage 1 model TFLOP/step"] > 0 and values["forward student (TFLOP)"] > 0
    # Stage 2 with the fixed 3-call plan and DMD batch 2: 18 (rollout, grad) + 6 (critic + guided teacher)
    # + 6 (co-trained Stage 1, grad) + 2..6 (its null branch and difference points) + 6 + 6 (critic phase)
    assert 44 <= values["Stage 2 sample-forwards/step (backward = 3)"] <= 48
    saved = json.loads(out_json.read_text())
    assert saved["rows"] == rows and saved["config"]["plan"] == [4, 1]


def test_forward_flops_match_torch_flop_counter(bench):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dict(bench.wan_on_meta(bench.WAN_CONFIGS["tiny"]).config)
    shared = bench.build_shared(cfg, torch.device("cpu"), torch.float32, 8, ("student",), checkpointing=False)
    counter = bench.ForwardCounter(shared, cfg)
    x, text, t = torch.randn(2, 3, 16, 4, 6), torch.randn(2, 7, 32), torch.full((2,), 500.0)
    for role in ("student", "teacher"):      # with and without the LoRA adapter's FLOPs
        counter.reset()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            shared.role(role)(x, t, t, text)   # the math backend's bmm's make attention countable
        (call,) = counter.calls
        assert (call.batch, call.latent, call.text_len, call.backward) == (2, (3, 4, 6), 7, False)
        assert counter.call_flops(call) == fc.get_total_flops()
    with torch.enable_grad():
        shared.role("student")(x, t, t, text)
    assert counter.calls[-1].backward and counter.forward_equivalents() == 2 * 1 + 2 * 3


def test_out_of_memory_falls_back_to_the_next_size(bench, capsys):
    sizes = [bench.VideoSize.parse(s) for s in ("81x480x832", "49x480x832", "17x240x416")]
    tried = []

    def run(size):
        tried.append(size.frames)
        if size.frames > 17:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"ok": True}

    size, res = bench.with_fallback("Stage 1", sizes, run, None, torch.device("cpu"), (1, 2, 2))
    assert tried == [81, 49, 17] and size == sizes[2] and res == {"ok": True}
    assert "retrying at 49x480x832 (latent 13x60x104, 20280 tokens)" in capsys.readouterr().out
    assert bench.with_fallback("x", sizes[:1], run, None, torch.device("cpu"), (1, 2, 2)) == (None, {})
    assert sizes[0].latent == (21, 60, 104) and sizes[0].tokens((1, 2, 2)) == 32760


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_part(tmp_path):
    """benchmarks/gpu_check.py --device cpu: the whole check (both tiny chains, placement, the pipelines, the
    tiny throughput) runs here, so the script is ready whenever a GPU is lent."""
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    result = module.main(["--device", "cpu", "--throughput-size", "tiny", "--repeats", "1", "--out", str(out),
                          "--workdir", str(tmp_path / "work")])
    saved = json.loads(out.read_text())
    assert saved == result and result["ok"], [p.get("error") for p in result["parts"] if not p["ok"]]
    names = [p["name"] for p in result["parts"]]
    for part in ("Stage 2 (LoRA roles on one base)", "AnyFlowPipeline at 1 and 4 steps", "causal Stage 2",
                 "AnyFlowFARPipeline at 1 and 4 steps (T2V, I2V)", "throughput (tiny)"):
        assert part in names
    pipeline = next(p for p in result["parts"] if p["name"] == "AnyFlowPipeline at 1 and 4 steps")
    assert pipeline["N=4"]["shape"] == [1, 17, 32, 32, 3]
    rows = next(p for p in result["parts"] if p["name"] == "throughput (tiny)")["rows"]
    assert any(r["metric"] == "Stage 2 step (s)" and r["value"] > 0 for r in rows)
