"""Many processes train what one does: the global batch and its parts, gradient accumulation, and (slow lane)
``torchrun --nproc-per-node=2`` with gloo on the CPU against one process, for the gmm world and the tiny-Wan path,
plus a rank killed mid-run.

Tolerances: the split changes only the order in which floats are summed (the per-sample values are the same
numbers, drawn for the whole batch and cut), so losses agree to ~1e-6 relative and weights after a few AdamW
steps to ~1e-5; a wrong draw, a missing gradient sum or a mis-scaled loss is off by 1e-2 or more.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anystep import rng
from anystep import time as T
from anystep.build import build_trainer
from anystep.config import ConfigError, resolve
from anystep.errors import UsageError
from anystep.global_batch import Part, parts_of
from anystep.objectives.conditioning import drop_condition
from anystep.recipes import train
from anystep.train.checkpoint import find_checkpoint
from anystep.train.loop import TrainConfig


# ---------------------------------------------------------------------------------------------- the parts
def test_parts_tile_the_global_batch_round_by_round():
    rows = [(r, j, parts_of(r, 2, 3)[j].rows(12)) for r in range(2) for j in range(3)]
    covered = sorted(i for _, _, s in rows for i in range(s.start, s.stop))
    assert covered == list(range(12))
    # round j = rows [4j, 4j + 4): rank 0 takes the first half, rank 1 the second
    assert {(r, j): (s.start, s.stop) for r, j, s in rows}[(1, 2)] == (10, 12)
    with pytest.raises(UsageError, match="does not split into 6 equal parts"):
        parts_of(0, 2, 3)[0].rows(8)
    with pytest.raises(ValueError):
        Part(2, 2)


def _draws(world_size: int, accumulation: int, n: int = 8, seed: int = 3) -> list[torch.Tensor]:
    """Every per-row draw of a Stage-1 step (times, buckets, dropout, noise), each part drawn from the step's
    generator state and the parts put back in global row order."""
    pieces = []
    for part in sorted((p for r in range(world_size) for p in parts_of(r, world_size, accumulation)),
                       key=lambda p: p.index):
        g, rows = torch.Generator().manual_seed(seed), n // part.count
        pairs = T.sample_time_pairs(rows, 5.0, part=part, generator=g)
        _, keep = drop_condition(torch.ones(rows, 1), torch.zeros(1, 1), 0.3, rows, g, part)
        pieces.append((pairs.t, pairs.r, pairs.bucket, keep, rng.noise_like(torch.empty(rows, 2, 3), g, part)))
    return [torch.cat(column) for column in zip(*pieces)]


@pytest.mark.parametrize("world_size, accumulation", [(2, 1), (4, 1), (1, 2), (2, 2), (1, 8)])
def test_every_draw_is_the_single_batch_one_whatever_the_split(world_size, accumulation):
    g = torch.Generator().manual_seed(3)
    pairs = T.sample_time_pairs(8, 5.0, generator=g)
    _, keep = drop_condition(torch.ones(8, 1), torch.zeros(1, 1), 0.3, 8, g)
    whole = [pairs.t, pairs.r, pairs.bucket, keep, rng.noise_like(torch.empty(8, 2, 3), g)]
    for split, one in zip(_draws(world_size, accumulation), whole):
        assert torch.equal(split, one)


def test_stratified_buckets_are_exact_over_the_global_batch():
    for seed in range(30):
        buckets = _draws(2, 4, n=16, seed=seed)[2]     # 2 processes x 4 micro-batches of 2
        assert torch.bincount(buckets, minlength=3).tolist() == [8, 4, 4]


def test_accumulation_settings_resolve_or_name_the_problem():
    assert TrainConfig(batch_size=32).accumulation(16) == 1
    assert TrainConfig(batch_size=32, micro_batch_size=2).accumulation(1) == 16
    assert TrainConfig(batch_size=32, micro_batch_size=2).accumulation(8) == 2
    assert TrainConfig(batch_size=32, grad_accumulation=4, micro_batch_size=4).accumulation(2) == 4
    for cfg, world, message in [(TrainConfig(batch_size=6), 4, "does not split over 4 processes"),
                                (TrainConfig(batch_size=8, micro_batch_size=3), 1, "whole micro-batches"),
                                (TrainConfig(batch_size=8, grad_accumulation=3), 1, "3 equal micro-batches"),
                                (TrainConfig(batch_size=8, grad_accumulation=2, micro_batch_size=2), 1, "disagrees")]:
        with pytest.raises(ValueError, match=message):
            cfg.accumulation(world)
    with pytest.raises(ValueError, match="grad_accumulation must be >= 1"):
        TrainConfig(grad_accumulation=0)


# ---------------------------------------------------------------------------------------------- accumulation
FAST = ["train.threads=1", "train.log_every=1", "train.checkpoint_every=1000"]


def _weights(run: Path, role: str = "student") -> dict[str, torch.Tensor]:
    return load_file(str(find_checkpoint(run / "checkpoints") / f"{role}.safetensors"))


def _losses(run: Path) -> dict[int, dict[str, float]]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("loss/")}
                for r in csv.DictReader(f)}


def assert_same_run(a: Path, b: Path, roles=("student",), max_abs: float = 1e-6):
    """The same logged losses (rel 1e-5) and the same final weights: every entry within 1e-6 except at most
    1e-5 of them, which may differ by up to ``max_abs``. (AdamW divides by the root of the squared gradient:
    where an entry's gradient is at float-noise level, summation order can move its update by up to
    2 lr per step; with betas (0, 0.999) that is the first step's whole update.)"""
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        for key, value in la[step].items():
            if key in ("loss/stage1", "loss/flow_matching", "loss/dmd", "loss/critic"):
                assert lb[step][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    for role in roles:
        wa, wb = _weights(a, role), _weights(b, role)
        assert wa.keys() == wb.keys()
        diff = torch.cat([(wa[k].double() - wb[k].double()).abs().flatten() for k in wa])
        assert float(diff.max()) <= max(max_abs, 1e-6), (role, float(diff.max()))
        assert float((diff > 1e-6).double().mean()) <= 1e-5, (role, int((diff > 1e-6).sum()), diff.numel())
    va, vb = _validation(a), _validation(b)      # the validation at the end: every process sampled, rank 0 judged
    assert [r["N"] for r in va] == [r["N"] for r in vb] and va
    for ra, rb in zip(va, vb):
        assert rb == pytest.approx(ra, rel=1e-3, abs=1e-4), (ra, rb)


def _validation(run: Path) -> list[dict[str, float]]:
    folders = sorted((run / "validation").glob("step_*"))
    return json.loads((folders[-1] / "metrics.json").read_text())["rows"]


@pytest.fixture(scope="module")
def gmm_teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("gmm") / "teacher"
    train(resolve("gmm_teacher", [f"train.out_dir={run}", "train.steps=40", "train.batch_size=64", *FAST]),
          progress=False)
    return run


@pytest.mark.parametrize("preset, extra", [
    ("gmm_teacher", []),
    ("gmm_stage1", ["stage1.rebalance_power=0"]),
])
def test_gradient_accumulation_trains_what_one_batch_trains(preset, extra, gmm_teacher, tmp_path):
    role = "teacher" if preset == "gmm_teacher" else "student"
    common = [*FAST, "train.steps=6", "train.batch_size=8", *extra,
              *([] if role == "teacher" else [f"model.init={gmm_teacher}"])]
    one, acc = tmp_path / "one", tmp_path / "acc"
    train(resolve(preset, [*common, f"train.out_dir={one}"]), progress=False)
    accumulated = resolve(preset, [*common, f"train.out_dir={acc}", "train.micro_batch_size=4"])
    assert len(build_trainer(accumulated, progress=False).parts) == 2    # two micro-batches do run
    train(accumulated, progress=False)
    assert_same_run(one, acc, roles=(role,))


def test_a_batch_that_does_not_split_is_a_config_error(gmm_teacher, tmp_path):
    with pytest.raises(ConfigError, match="micro-batches"):
        train(resolve("gmm_stage1", [*FAST, "train.steps=1", "train.batch_size=8", "train.micro_batch_size=3",
                                     f"model.init={gmm_teacher}", f"train.out_dir={tmp_path / 'r'}"]),
              progress=False)


def test_the_parallelism_is_chosen_by_size_and_what_fsdp_cannot_run_is_refused(monkeypatch, gmm_teacher, tmp_path):
    from torch import nn

    from anystep import build
    from anystep.train.distributed import Processes
    two, cfg = Processes(0, 2, 0), resolve("gmm_stage1", [f"model.init={gmm_teacher}"])
    roles = {"student": nn.Linear(4, 4), "teacher": nn.Linear(4, 4)}
    assert build._parallel(cfg, roles, two) == "ddp"            # auto: 40 parameters
    monkeypatch.setattr(build, "FSDP_FROM", 40)
    assert build._parallel(cfg, roles, two) == "fsdp"           # auto: from FSDP_FROM parameters on
    jvp = resolve("gmm_stage1", [f"model.init={gmm_teacher}", "train.parallel=fsdp", "stage1.derivative=jvp"])
    with pytest.raises(ConfigError, match="jvp"):
        build._parallel(jvp, roles, two)
    with pytest.raises(ConfigError, match="launch with torchrun"):
        train(resolve("gmm_stage1", [*FAST, "train.steps=1", "train.parallel=fsdp", f"model.init={gmm_teacher}",
                                     f"train.out_dir={tmp_path / 'r'}"]), progress=False)


# ---------------------------------------------------------------------------------------------- torchrun
SHOWN = {"ddp": "2 processes, networks replicated", "fsdp": "2 processes, networks sharded (FSDP2)"}


def _one(argv: list[str]) -> list[str]:
    """The overrides of a ``--config PRESET ...`` command line for the one-process reference run."""
    return [a for a in argv[2:] if not a.startswith("train.parallel=")]


def torchrun(nproc: int, *argv: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=nproc -m anystep ARGV`` on the CPU (gloo), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "anystep", *argv, "--no-progress"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if "ANYSTEP_FAULT" not in (env or {}):
        full_env.pop("ANYSTEP_FAULT", None)
    out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode and "address already in use" in out.stderr.lower():   # the launcher's free-port race:
        out = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600, check=False)  # again
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gmm_processes_train_what_one_does_stage1_and_stage2(parallel, gmm_teacher, tmp_path):
    """Stage 1 with the rebalance on (its diffusion mean summed over both processes) and Stage 2 (DMD against
    the exact teacher, a critic, the co-trained loss): 2 processes x 4 rows = 1 process x 8 rows, replicated
    or sharded (FSDP2)."""
    s1 = ["--config", "gmm_stage1", f"model.init={gmm_teacher}", "train.steps=6", "train.batch_size=8", *FAST,
          f"train.parallel={parallel}"]
    train(resolve("gmm_stage1", [*_one(s1), f"train.out_dir={tmp_path / 's1_one'}"]), progress=False)
    out = torchrun(2, "stage1", *s1, f"train.out_dir={tmp_path / 's1_two'}")
    assert SHOWN[parallel] in out.stdout    # the mode asked for is the one that ran
    assert_same_run(tmp_path / "s1_one", tmp_path / "s1_two")
    s2 = ["--config", "gmm_stage2", f"model.init={tmp_path / 's1_one'}", "train.steps=4", "train.batch_size=8",
          "stage2.dmd_batch_size=4", *FAST, f"train.parallel={parallel}"]
    train(resolve("gmm_stage2", [*_one(s2), f"train.out_dir={tmp_path / 's2_one'}"]), progress=False)
    out = torchrun(2, "stage2", *s2, f"train.out_dir={tmp_path / 's2_two'}")
    assert SHOWN[parallel] in out.stdout
    assert_same_run(tmp_path / "s2_one", tmp_path / "s2_two", roles=("student", "critic", "student_ema"),
                    max_abs=2 * 5e-5 * 4)   # 2 lr x steps
    # rank 0 alone wrote: one metrics file with one row per logged step, one config, checkpoints complete
    assert len(_losses(tmp_path / "s2_two")) == 4 and (tmp_path / "s2_two" / "config.yaml").is_file()
    assert out.stdout.count("done: checkpoint") == 1 and out.stdout.count(SHOWN[parallel]) == 1


@pytest.mark.slow
def test_two_sharded_processes_train_a_causal_student_as_one_process_does(tmp_path):
    """A causal (FAR) student under FSDP2: teacher forcing (Stage 1), then Stage 2's chunk-by-chunk rollout
    against its KV cache."""
    s1 = ["--config", "shapes_far_stage1", "train.steps=3", "train.batch_size=4", *FAST, "train.parallel=fsdp"]
    train(resolve("shapes_far_stage1", [*_one(s1), f"train.out_dir={tmp_path / 'one'}"]), progress=False)
    assert SHOWN["fsdp"] in torchrun(2, "stage1", *s1, f"train.out_dir={tmp_path / 'two'}").stdout
    assert_same_run(tmp_path / "one", tmp_path / "two", max_abs=1e-5)
    s2 = ["--config", "shapes_far_stage2", f"model.init={tmp_path / 'one'}", "train.steps=2", "train.batch_size=4",
          "stage2.dmd_batch_size=2", *FAST, "train.parallel=fsdp"]
    train(resolve("shapes_far_stage2", [*_one(s2), f"train.out_dir={tmp_path / 's2_one'}"]), progress=False)
    assert SHOWN["fsdp"] in torchrun(2, "stage2", *s2, f"train.out_dir={tmp_path / 's2_two'}").stdout
    assert_same_run(tmp_path / "s2_one", tmp_path / "s2_two", roles=("student", "critic"), max_abs=1e-5)


@pytest.mark.slow
def test_the_rebalance_mean_is_global_with_one_row_per_process(gmm_teacher, tmp_path):
    """2 processes x 1 row: one holds the diffusion sample, the other a non-diffusion one, which is rebalanced
    to the first's loss (summed over the processes); without the sum it would use its running mean."""
    s1 = ["--config", "gmm_stage1", f"model.init={gmm_teacher}", "train.steps=6", "train.batch_size=2",
          "stage1.rebalance_power=1", *FAST]
    train(resolve("gmm_stage1", [*_one(s1), f"train.out_dir={tmp_path / 'one'}"]), progress=False)
    torchrun(2, "stage1", *s1, f"train.out_dir={tmp_path / 'two'}")
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_two_processes_with_accumulation_train_what_one_process_does(gmm_teacher, tmp_path):
    """2 processes x 2 micro-batches of 2 rows = 1 process x 8 rows (Stage 1, rebalance off: with accumulation
    its diffusion mean is per round of micro-batches)."""
    s1 = ["--config", "gmm_stage1", f"model.init={gmm_teacher}", "train.steps=5", "train.batch_size=8",
          "stage1.rebalance_power=0", *FAST]
    train(resolve("gmm_stage1", [*s1[2:], f"train.out_dir={tmp_path / 'one'}"]), progress=False)
    out = torchrun(2, "stage1", *s1, "train.micro_batch_size=2", f"train.out_dir={tmp_path / 'two'}")
    assert "replicated, 2 micro-batch(es) per process" in out.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_killed_rank_stops_the_job_and_a_resume_on_one_process_finishes_the_same_run(parallel, gmm_teacher,
                                                                                        tmp_path):
    """The checkpoint of a sharded run holds whole tensors: one process, or two sharded ones, resume it."""
    s1 = ["--config", "gmm_stage1", f"model.init={gmm_teacher}", "train.steps=8", "train.batch_size=8",
          "train.threads=1", "train.log_every=1", "train.checkpoint_every=4", f"train.parallel={parallel}"]
    assert SHOWN[parallel] in torchrun(2, "stage1", *s1, f"train.out_dir={tmp_path / 'whole'}").stdout
    killed = torchrun(2, "stage1", *s1, f"train.out_dir={tmp_path / 'killed'}",
                      env={"ANYSTEP_FAULT": "mid_step:6@1"}, check=False)
    assert killed.returncode != 0
    assert "Signals.SIGKILL" in killed.stderr or "exitcode" in killed.stderr, killed.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith("step"))
    assert ckpts == ["step_000004"] and (tmp_path / "killed" / "checkpoints" / "step_000004" / "COMPLETE").exists()
    shutil.copytree(tmp_path / "killed", tmp_path / "killed_2")
    train(resolve("gmm_stage1", [*_one(s1), f"train.out_dir={tmp_path / 'killed'}"]), resume=True, progress=False)
    assert_same_run(tmp_path / "whole", tmp_path / "killed", roles=("student", "student_ema"))
    torchrun(2, "stage1", *s1, f"train.out_dir={tmp_path / 'killed_2'}", "--resume")    # and on 2 processes
    assert_same_run(tmp_path / "whole", tmp_path / "killed_2", roles=("student", "student_ema"))


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from anystep.cli import main
    from anystep.models.tiny_folder import build_tiny_wan_folder, write_tiny_clips
    root = tmp_path_factory.mktemp("tiny_wan")
    wan = build_tiny_wan_folder(root / "wan")
    clips = write_tiny_clips(root / "clips", n=4, frames=9, height=48, width=64, speed=4)
    assert main(["cache", "--model", str(wan), "--videos", str(clips), "--out", str(root / "cache"), "--frames", "5",
                 "--height", "32", "--width", "32", "--dtype", "float32", "--no-progress"]) == 0
    return root, [f"world.wan.model={wan}", f"world.wan.data={root / 'cache'}"]


# fp32 everywhere: in bf16 a batch of 2 and two batches of 1 round differently (~1e-2), which would hide nothing
WAN = ["model.lora_rank=4", "model.lora_alpha=8", "model.base_dtype=float32", "train.mixed_precision=fp32",
       "train.batch_size=4", "train.micro_batch_size=2", "train.threads=1", "train.log_every=1"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_tiny_wan_processes_train_what_one_does_stage1_and_stage2(parallel, tiny_wan, tmp_path):
    """The real path (LoRA on a frozen Wan base, latents from the cache, each process reading its rows):
    2 processes x 2 rows = 1 process x 4 rows, Stage 1 and Stage 2 (teacher: the raw model)."""
    _, world = tiny_wan
    s1 = ["--config", "wan1.3b_stage1", *world, *WAN, "train.steps=3", "optim.student.lr=1e-3",
          "optim.student.warmup_steps=1", f"train.parallel={parallel}"]
    one = ["train.micro_batch_size=4"]
    train(resolve("wan1.3b_stage1", [*_one(s1), *one, f"train.out_dir={tmp_path / 's1_one'}"]), progress=False)
    assert SHOWN[parallel] in torchrun(2, "stage1", *s1, f"train.out_dir={tmp_path / 's1_two'}").stdout
    assert_same_run(tmp_path / "s1_one", tmp_path / "s1_two", max_abs=2 * 1e-3 * 3)
    s2 = ["--config", "wan1.3b_stage2", *world, *WAN, "train.steps=2", "stage2.rollout_steps=[2,4]",
          "stage2.dmd_batch_size=4", "stage2.teacher=null", "optim.student.lr=1e-3", "optim.critic.lr=1e-3",
          f"model.init={tmp_path / 's1_one'}", f"train.parallel={parallel}"]
    train(resolve("wan1.3b_stage2", [*_one(s2), *one, f"train.out_dir={tmp_path / 's2_one'}"]), progress=False)
    assert SHOWN[parallel] in torchrun(2, "stage2", *s2, f"train.out_dir={tmp_path / 's2_two'}").stdout
    assert_same_run(tmp_path / "s2_one", tmp_path / "s2_two", roles=("student", "critic"), max_abs=2 * 1e-3 * 2)


def _cache_items(folder: Path) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    from anystep.data.latent_cache import LatentCache
    cache = LatentCache(folder)
    return [(i, c, *cache.item(k)) for k, (i, c) in enumerate(zip(cache.ids, cache.captions))]


def assert_same_cache(a: Path, b: Path) -> None:
    one, two = _cache_items(a), _cache_items(b)
    assert [x[:2] for x in one] == [x[:2] for x in two] and len(one) > 0
    for x, y in zip(one, two):
        assert torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]), x[0]


@pytest.mark.slow
def test_two_processes_cache_and_synthesize_what_one_process_writes(tiny_wan, tmp_path):
    """Each process writes its chunks of the items into its own part; rank 0 joins them: the same items in the
    same order with the same tensors. A run cut short on 2 processes is finished by 1 process."""
    from anystep.cli import main
    root, world = tiny_wan
    wan, clips = world[0].split("=", 1)[1], root / "clips"
    cache = ["cache", "--model", wan, "--videos", str(clips), "--frames", "5", "--height", "32", "--width", "32",
             "--dtype", "float32", "--shard-size", "1"]
    assert main([*cache, "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    torchrun(2, *cache, "--out", str(tmp_path / "two"))
    assert_same_cache(tmp_path / "one", tmp_path / "two")
    assert len(list((tmp_path / "two" / "parts").iterdir())) == 2
    torchrun(2, *cache, "--out", str(tmp_path / "resumed"), "--limit", "3")          # cut short ...
    assert len(_cache_items(tmp_path / "resumed")) == 3
    shutil.rmtree(tmp_path / "resumed" / "parts" / "rank-00001-of-00002")          # ... rank 1's work lost,
    (tmp_path / "resumed" / "index.json").unlink()                                 # never joined
    assert main([*cache, "--out", str(tmp_path / "resumed"), "--no-progress"]) == 0  # ... finished by one
    assert_same_cache(tmp_path / "one", tmp_path / "resumed")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red block moving right\na blue disk moving left\na green block moving up\n")
    synth = ["synthesize", "--model", wan, "--prompts", str(prompts), "--steps", "2", "--frames", "5",
             "--height", "32", "--width", "32", "--dtype", "float32", "--shard-size", "1"]
    assert main([*synth, "--out", str(tmp_path / "s_one"), "--no-progress"]) == 0
    torchrun(2, *synth, "--out", str(tmp_path / "s_two"))
    assert_same_cache(tmp_path / "s_one", tmp_path / "s_two")


def test_one_process_commands_refuse_torchrun(monkeypatch, capsys):
    from anystep.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "runs/none"]) == 2
    assert "runs in one process; start it without torchrun" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the README
def _readme_torchrun_lines() -> list[list[str]]:
    import re
    import shlex
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Many processes"):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("torchrun")]


def test_readme_torchrun_lines_are_valid_commands(capsys):
    """Each ``torchrun`` line of the README: launcher flags the tests use or torchrun documents, then an
    anystep command that parses (training commands resolve their preset with ``--dry-run``)."""
    from anystep.cli import main, parse
    lines = _readme_torchrun_lines()
    assert len(lines) == 4
    launcher = {"--standalone", "--nproc-per-node", "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"}
    for argv in lines:
        m = argv.index("-m")
        assert argv[m + 1] == "anystep" and {a.split("=")[0] for a in argv[1:m]} <= launcher, argv
        command = [a.replace("$WAN", "models/wan").replace("$HEAD", "head") for a in argv[m + 2:]]
        if command[0] in ("cache", "synthesize"):
            assert parse(command).command == command[0]
        else:
            assert main([*command, "--dry-run"]) == 0


@pytest.mark.slow
def test_readme_cpu_torchrun_line_trains_what_one_process_trains(tmp_path):
    cpu = next(argv for argv in _readme_torchrun_lines() if "gmm_teacher" in argv)
    m = cpu.index("-m")
    extra = ["train.steps=10", "train.batch_size=64", *FAST]
    torchrun(int(cpu[m - 1].split("=")[1]), *cpu[m + 2:], *extra, f"train.out_dir={tmp_path / 'two'}")
    train(resolve("gmm_teacher", [*extra, f"train.out_dir={tmp_path / 'one'}"]), progress=False)
    assert_same_run(tmp_path / "one", tmp_path / "two", roles=("teacher",))
