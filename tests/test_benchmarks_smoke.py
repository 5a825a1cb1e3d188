"""Smoke tests of the benchmarks: wan_throughput.py's tiny CPU run, its FLOP formula and its OOM fallback; the
CPU cost benchmarks' rows at tiny sizes; the official-call-layout row running the library's own Stage-1 loss;
roles_memory.py's layouts; gpu_check.py's CPU mode and gpu_table.py; step_profile.py's breakdown."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    """benchmarks/NAME.py as a module (benchmarks/ on sys.path for their shared ``_common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    try:
        yield _load("wan_throughput")
    finally:
        sys.modules.pop("wan_throughput", None)


@pytest.fixture
def cpu_setup_restored():
    """The shapes benchmarks flush denormals (as the CLI does); leave the test process as it was."""
    flush, threads = torch.set_flush_denormal(False), torch.get_num_threads()
    yield
    torch.set_flush_denormal(flush)
    torch.set_num_threads(threads)


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


def test_tiny_cpu_run_with_fsdp_times_the_sharded_steps(bench, capsys):
    """``--fsdp``: the same steps with the base and adapters sharded by anystep's FSDP2 path (a group of one
    process, left again at the end)."""
    import torch.distributed as dist

    rows = bench.main(["--size", "tiny", "--device", "cpu", "--repeats", "1", "--fsdp", "--skip", "forward"])
    values = {r["metric"]: r["value"] for r in rows}
    assert values["Stage 1 (FSDP2, 1 process) step (s)"] > 0 and values["Stage 2 (FSDP2, 1 process) step (s)"] > 0
    assert 44 <= values["Stage 2 (FSDP2, 1 process) sample-forwards/step (backward = 3)"] <= 48
    assert "FSDP2-sharded in one process" in capsys.readouterr().out and not dist.is_initialized()


def test_anystep_speedup_times_both_pipelines_on_a_tiny_cpu_run(tmp_path):
    """``benchmarks/anystep_speedup.py``: WanPipeline at 50 steps x CFG against AnyFlowPipeline at 1/2/4/8."""
    speedup = _load("anystep_speedup")
    rows = speedup.main(["--size", "tiny", "--device", "cpu", "--json", str(tmp_path / "s.json")])
    assert [(r["pipeline"], r["transformer calls"]) for r in rows] == [
        ("WanPipeline", 100), ("AnyFlowPipeline", 1), ("AnyFlowPipeline", 2), ("AnyFlowPipeline", 4),
        ("AnyFlowPipeline", 8)]
    assert all(r["denoise (s)"] > 0 and r["end to end (s)"] > 0 for r in rows)
    assert rows[0]["speed-up, denoise"] == 1.0 and json.loads((tmp_path / "s.json").read_text())["rows"] == rows


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


def test_tiny_cpu_run_times_the_causal_steps(bench):
    """``--causal``: the FAR student's Stage 1 (teacher forcing) and Stage 2 (KV-cache self-rollout) steps."""
    rows = bench.main(["--size", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--causal",
                       "--skip", "forward,stage1,stage2"])
    values = {r["metric"]: r["value"] for r in rows}
    for stage in ("causal Stage 1", "causal Stage 2"):
        assert values[f"{stage} step (s)"] > 0 and values[f"{stage} model TFLOP/step"] > 0
        assert values[f"{stage} MFU (%)"] is None      # CPU
    assert values["causal Stage 2 sample-forwards/step (backward = 3)"] > values[
        "causal Stage 1 sample-forwards/step (backward = 3)"]
    assert bench.far_partition(21) == (1, 3, 3, 3, 3, 3, 3, 2) and bench.far_partition(9) == (1, 3, 3, 2)


def test_far_flops_match_torch_flop_counter(bench):
    """The FAR counter's FLOPs of every kind of call against torch's FLOP counter (math SDPA): exact where
    attention is unmasked (bidirectional, a chunk against the KV cache); for the masked calls the dense path
    computes all L^2 pairs, the formula only the allowed ones, counted independently from the dense mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from anystep.causal import TeacherForcing
    from anystep.models import far_masks

    b = bench.setup(["--size", "tiny", "--device", "cpu", "--base-dtype", "float32", "--no-checkpointing"])
    shared = bench.far_shared(b, ("student",))
    shared.base.register_to_config(chunk_partition=(1, 1, 1, 1, 1))     # 2 compressed context chunks
    counter = bench.FARCounter(shared, b.cfg)
    g = torch.Generator().manual_seed(0)
    x, text, t = torch.randn(2, 5, 16, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.full((2,), 5e2)
    student, cache = shared.role("student"), shared.role("student").cache()
    per_pair = 4 * b.cfg["num_layers"] * b.cfg["num_attention_heads"] * b.cfg["attention_head_dim"] * 2  # x batch
    calls = {"bidirectional": lambda: shared.role("teacher").bidirectional(x, t, t, text),
             "teacher forcing": lambda: student(x[:, 2:], t, t, TeacherForcing(text, x[:, 2:], x[:, :2])),
             "prefill": lambda: cache.prefill(x[:, :4], text, [1, 1, 1, 1]),
             "chunk": lambda: cache(x[:, 4:], t, t, text)}
    for name, run in calls.items():
        counter.reset()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            run()
        (call,) = counter.calls
        masked = name in ("teacher forcing", "prefill")
        if masked:
            mode, has_clean = ("train", True) if name == "teacher forcing" else ("cache", False)
            mask = far_masks.block_mask(shared.base, mode=mode, chunk_partition=[1, 1, 1, 1, 1][:4 + has_clean],
                                        height=8, width=8, has_clean=has_clean, device=torch.device("cpu"))
            assert call.pairs == int(far_masks.dense_mask(mask, call.tokens).sum()) < call.tokens ** 2, name
        skipped = call.tokens ** 2 - call.pairs if masked else 0
        assert counter.call_flops(call) == fc.get_total_flops() - per_pair * skipped, name
    assert (call.tokens, call.pairs) == (16, 16 * (16 + 2 * 4 + 2 * 16))   # 2 compressed + 2 full cached frames


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


def _rows(out: str, header: str) -> dict[str, list[float]]:
    """The two numbers (s/iter, x flow matching) of each row of a benchmark's ratio table, by row name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 1:]:
        name, *numbers = line.rsplit(None, 2)
        try:
            rows[name.rstrip()] = [float(v) for v in numbers]
        except ValueError:
            break
    return rows


def test_official_layout_row_is_the_library_loss_in_three_separate_no_grad_calls():
    """stage1_cost's "official layout" row: the library's Stage-1 loss, its one batched no-grad call made as three
    separate full-batch calls (null branch, t + eps, t - eps) as the official code makes them; the same value."""
    from anystep.models import zoo
    from anystep.models.architectures import ToyWanConfig
    from anystep.objectives.flowmap import Stage1Config, Stage1Objective
    from anystep.worlds.shapes import ShapesData

    separate_calls = _load("stage1_cost").SeparateCalls
    world = ShapesData()
    student = zoo.student_from(zoo.velocity_network(world.network, ToyWanConfig(), world.network_inputs()))
    x0, cond = world.batch(8, torch.Generator().manual_seed(0))
    calls = []
    student.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["hidden_states"].shape[0], torch.is_grad_enabled())), with_kwargs=True)
    losses, layouts = [], []
    for model in (student, separate_calls(student, 8)):
        calls.clear()
        objective = Stage1Objective(Stage1Config(cond_dropout=0.0), world.null_cond)
        losses.append(objective(model, x0, cond, torch.Generator().manual_seed(1))[0])
        layouts.append(list(calls))
    torch.testing.assert_close(losses[1], losses[0])
    (grad, batched), separate = layouts[0], layouts[1]
    assert grad == (8, True) and not batched[1] and 8 < batched[0] < 3 * 8   # some r = t rows get no points
    assert separate == [(8, True), (8, False), (8, False), (8, False)]


def test_cpu_cost_benchmarks_time_every_row(capsys, cpu_setup_restored):
    """stage1_cost.py and training_cost.py at tiny sizes: every row timed through the library's trainer."""
    times = _load("stage1_cost").main(["--batch", "4", "--iters", "1", "--threads", "1"])
    assert list(times) == ["flow matching", "stage 1, official layout", "stage 1, anystep (batched)",
                           "stage 1, exact JVP"] and min(times.values()) > 0
    printed = _rows(capsys.readouterr().out, "step")
    assert list(printed) == list(times) and printed["flow matching"][1] == 1.0
    times = _load("training_cost").main(["--batch", "2", "--dmd-batch", "1", "--iters", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert len(times) == 10 and min(times.values()) > 0 and list(_rows(out, "iteration")) == list(times)
    for kind in ("flow-map", "consistency"):
        assert f"{kind} backward sim. N=16 / N=4: " in out


@pytest.mark.slow
def test_roles_memory_measures_every_layout(capsys):
    """roles_memory.py at a tiny size (a child process per layout): one base holds fewer parameter bytes than
    three copies, and every layout trains the same adapter state (gradients, AdamW, EMA)."""
    results = _load("roles_memory").main(["--hidden", "32", "--head-dim", "16", "--layers", "1", "--ffn-dim", "64",
                                          "--rank", "4", "--text-dim", "32", "--iters", "1"])
    by = {r["layout"]: r for r in results}
    assert list(by) == ["copies", "shared", "shared+teacher"]
    assert by["copies"]["params"] > by["shared+teacher"]["params"] > by["shared"]["params"]
    assert len({r["train_state"] for r in results}) == 1 and len({r["trainable"] for r in results}) == 1
    assert all(r["peak"] > 0 and r["sec_per_iter"] > 0 for r in results)
    assert "peak copies / shared = " in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_part(tmp_path):
    """benchmarks/gpu_check.py --device cpu: the whole check (both tiny chains, placement, the pipelines, the
    tiny throughput with its profile, the levers, every lever on, the speed-up, the 'big' part) runs here, so the
    script is ready whenever a GPU is lent; gpu_table.py renders its JSON into the README's tables. (The compile
    lever is left out here for time: tests/test_speed_levers.py runs it.)"""
    module = _load("gpu_check")
    out = tmp_path / "check.json"
    result = module.main(["--device", "cpu", "--throughput-size", "tiny", "--repeats", "1", "--out", str(out),
                          "--workdir", str(tmp_path / "work"), "--levers", "attention,fused,checkpointing"])
    saved = json.loads(out.read_text())
    assert saved == result and result["ok"], [p.get("error") for p in result["parts"] if not p["ok"]]
    parts = {p["name"]: p for p in result["parts"]}
    for part in ("Stage 2 (LoRA roles on one base)", "AnyFlowPipeline at 1 and 4 steps", "causal Stage 2",
                 "AnyFlowFARPipeline at 1 and 4 steps (T2V, I2V)", "throughput (tiny)",
                 "lever: attention math (tiny, Stage 1)", "lever: fused AdamW (tiny, Stage 1)",
                 "all levers (tiny, Stage 1 and Stage 2)", "any-step speed-up (tiny)", "throughput (tiny, all levers)",
                 "causal (tiny, compiled flex)", "causal (tiny, eager flex, Stage 1)"):
        assert part in parts, part
    assert "lever: compiled blocks (tiny, Stage 1)" not in parts          # --levers leaves it out
    assert parts["AnyFlowPipeline at 1 and 4 steps"]["N=4"]["shape"] == [1, 17, 32, 32, 3]
    rows = parts["throughput (tiny)"]["rows"]
    assert any(r["metric"] == "Stage 2 step (s)" and r["value"] > 0 for r in rows)
    profile = parts["throughput (tiny)"]["profile"]
    assert set(profile) == {"Stage 1", "Stage 2"} and profile["Stage 1"]["rows"]["recompute"]["linear"] > 0
    measured = {p["levers"][0] for n, p in parts.items() if n.startswith("lever: ")}
    assert measured == {"train.attention_backend=_native_math", "optim.fused=true",
                        "train.checkpoint_save=attention", "train.checkpoint_fraction=0.5"}
    assert set(parts["all levers (tiny, Stage 1 and Stage 2)"]["levers"]) <= measured

    table = _load("gpu_table").main([str(out)])
    base_time = next(r["value"] for r in rows if r["metric"] == "Stage 1 step (s)")
    fused = next(r["value"] for r in parts["lever: fused AdamW (tiny, Stage 1)"]["rows"]
                 if r["metric"] == "Stage 1 step (s)")
    assert f"| none (baseline) | {base_time:.4g} |" in table
    assert f"| optim.fused=true | {fused:.4g} |" in table and f"{base_time / fused:.2f}x" in table
    for heading in ("### Each lever alone, Stage 1", "### Before and after, every lever on",
                    "### Where the time goes", "### tiny on one device", "### The any-step speed-up",
                    "### The causal (FAR) student"):
        assert heading in table, heading


def _profiled(checkpointing: bool):
    """One tiny-Wan LoRA forward + backward of the student under the profiler with step_profile's scopes."""
    from torch.profiler import profile

    wt, sp = _load("wan_throughput"), _load("step_profile")
    b = wt.setup(["--size", "tiny", "--device", "cpu", "--base-dtype", "float32"]
                 + ([] if checkpointing else ["--no-checkpointing"]))
    shared = b.shared(("student",))
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn((1, 3, 16, 4, 4), generator=g), torch.randn((1, 8, 32), generator=g)
    t, r = torch.full((1,), 700.0), torch.full((1,), 300.0)

    no_ema = type("NoEMA", (), {"emas": {}})()
    with sp.scopes(shared.base, list(shared.base.blocks), no_ema), profile() as prof:
        shared.role("student")(x, t, r, text).sum().backward()
    return sp, sp.breakdown(prof.events(), device_time=False)


def test_step_profile_puts_recomputation_lora_and_attention_in_their_cells():
    """The breakdown's cells follow what ran: checkpointing shows up as a recompute phase (the blocks' forward
    again inside backward: attention, linears and LoRA in it), without it there is none; LoRA linears are split
    from the base's, in forward and (through autograd's sequence numbers) in backward; nothing is counted twice
    (the cells add up to the sum of every operator's self time)."""
    sp, on = _profiled(checkpointing=True)
    _, off = _profiled(checkpointing=False)
    assert all(on["rows"]["recompute"][c] > 0 for c in ("attention", "linear", "lora"))
    assert sum(off["rows"]["recompute"].values()) == 0
    for result in (on, off):
        rows = result["rows"]
        assert rows["forward"]["lora"] > 0 and rows["backward"]["lora"] > 0 and rows["forward"]["attention"] > 0
        assert rows["backward"]["attention"] > 0 and rows["optimizer"]["linear"] == 0
        assert abs(sum(sum(r.values()) for r in rows.values()) - result["total_ms"]) < 1e-2
    assert sp.op_class("aten::_scaled_dot_product_flash_attention_backward") == "attention"
    assert sp.op_class("aten::addmm") == "linear" and sp.op_class("aten::_local_scalar_dense") == "sync"
    assert sp.op_class("aten::native_layer_norm") == "norm/elementwise" and sp.op_class("aten::_to_copy") == "copy"


def test_wan_throughput_levers_are_checked_and_pulled(bench, capsys):
    """--lever KEY=VALUE: an unknown key or a bad value is refused by name; a pulled lever reaches the model and
    the optimizer (the math attention backend on every attention processor, a fused AdamW) and the first-step
    loss is reported so that levers can be compared at equal numerics."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--lever", "train.nonsense=1"])
    assert "KEY one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--lever", "train.compile=everything"])
    assert "train.compile must be" in capsys.readouterr().err
    b = bench.setup(["--size", "tiny", "--device", "cpu", "--lever", "train.attention_backend=_native_math",
                     "--lever", "optim.fused=true"])
    shared = b.shared(("student",))
    backends = {m.processor._attention_backend for m in shared.base.modules() if hasattr(m, "processor")}
    assert backends == {"_native_math"} and b.optim == {"fused": True}
    rows = bench.main(["--size", "tiny", "--device", "cpu", "--repeats", "1", "--skip", "forward,stage2",
                       "--lever", "optim.fused=true"])
    loss = next(r["value"] for r in rows if r["metric"] == "Stage 1 first-step loss/stage1")
    assert loss > 0


def test_gpu_check_picks_the_levers_that_helped_by_measurement():
    """best_levers: a lever joins 'every lever on' only if it made Stage 1 faster alone with the baseline's
    first-step loss (bf16 tolerance); the fastest attention backend; compiled blocks or checkpointing that keeps
    attention, whichever was faster (they are not run together); keeping attention only with a fused backend."""
    module = _load("gpu_check")

    def rows(t, loss):
        return [{"metric": "Stage 1 step (s)", "value": t}, {"metric": "Stage 1 first-step loss/stage1", "value": loss}]

    def ctx(levers):
        c = module.Context(torch.device("cuda"), "1.3b", 1, Path("."), None)
        c.found = {"baseline": rows(1.0, 2.0), "levers": [(t, s, rows(t, loss)) for s, t, loss in levers]}
        return c

    measured = [("train.attention_backend=_native_flash", 0.5, 2.01),
                ("train.attention_backend=_native_cudnn", 0.4, 2.5),       # fastest, but not the same loss
                ("train.attention_backend=_native_efficient", 0.6, 2.0),
                ("optim.fused=true", 0.9, 2.0), ("train.compile=blocks", 0.7, 2.0),
                ("train.checkpoint_save=attention", 0.8, 2.0),
                ("train.checkpoint_fraction=0.5", 1.1, 2.0)]                # slower than the baseline
    assert module.best_levers(ctx(measured)) == ["train.attention_backend=_native_flash", "optim.fused=true",
                                                 "train.compile=blocks"]
    faster_save = [m if m[0] != "train.checkpoint_save=attention" else (m[0], 0.6, 2.0) for m in measured]
    assert module.best_levers(ctx(faster_save)) == ["train.attention_backend=_native_flash", "optim.fused=true",
                                                    "train.checkpoint_save=attention"]
    math = [("train.attention_backend=_native_math", 0.5, 2.0), ("train.checkpoint_save=attention", 0.6, 2.0)]
    assert module.best_levers(ctx(math)) == ["train.attention_backend=_native_math"]
