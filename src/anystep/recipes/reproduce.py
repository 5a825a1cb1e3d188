"""``anystep reproduce``: the paper's claims checked on the toy worlds, one markdown report with plots.

Every claim is a row of :data:`CLAIMS`: what the paper says (its figure or table), the runs that measure it,
and a verdict rule written down before looking at the numbers (:func:`verdict_*`). The runs (:data:`RUNS`) are
presets with one switch changed each (one thread each, ``jobs`` of them at a time, in dependency order). The
gmm runs, all from one teacher, are swept together at N = 1, 2, 4, 8, 16, 32 on one evaluation set (the
Fréchet distance to the exact class moments, lower is better; the exact ODE scores ~0.004 with 4000 samples).
The causal runs (shapes world, teacher-forced Stage 1 and on-policy Stage 2 from the shipped causal-world
teacher, and Stage 2 with one ingredient taken away each: DMD, the co-trained loss, the teacher's guidance) are
measured for exposure bias (:mod:`anystep.evaluate.exposure_bias`) with every per-chunk score, beside the
teacher's own per-chunk scores: what Stage 2 changes in the late chunks, and which ingredient does it. Runs
already finished in the output folder are reused (a killed report resumes where it stopped; delete a run's
folder to retrain it).

``--quick`` trains each run for a fiftieth of its steps and sweeps 500 samples (causal: 20 clips): the whole
pipeline in a few minutes (the tests run it); its numbers measure nothing, and its report says so on every
verdict.

Not covered here (the report lists them as "not measured"): Table 4's costs (``benchmarks/training_cost.py``
measures those) and the step scaling of students of the fine shapes teacher (``shipped:shapes_teacher_fine``,
whose own sweep the README shows; its students cost about 4x the demo's per step).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import resolve
from ..train.checkpoint import complete_checkpoints, newest_checkpoint

NS = (1, 2, 4, 8, 16, 32)
QUICK_DIVISOR, QUICK_MIN_STEPS, QUICK_SAMPLES, FULL_SAMPLES = 50, 20, 500, 4000
METRIC = "fd"


@dataclass(frozen=True)
class Run:
    """One training run: a gmm preset, its full budget, the switches changed, the run it starts from."""

    name: str
    preset: str
    steps: int
    overrides: tuple[str, ...] = ()
    init: str | None = None      # another run's name
    label: str = ""
    keep: bool = False           # keep a checkpoint every eighth of the run (the embedding-norm curve)

    def after(self) -> tuple[str, ...]:
        return (self.init,) if self.init else ()


RUNS: tuple[Run, ...] = (
    Run("teacher", "gmm_teacher", 3000, label="teacher (velocity network)"),
    Run("stage1", "gmm_stage1", 4000, (), "teacher",
        "Stage 1 (Beta(2,1.5) weight, copied r embedding, central difference eps 5)", keep=True),
    Run("stage1_uniform", "gmm_stage1", 4000, ("stage1.weight_type=uniform",), "teacher", "Stage 1, uniform w(t)"),
    Run("stage1_normal", "gmm_stage1", 4000, ("stage1.weight_type=normal",), "teacher", "Stage 1, Normal w(t)"),
    Run("stage1_zero_init", "gmm_stage1", 4000, ("model.delta_init=zero",), "teacher",
        "Stage 1, zero-initialised r embedding", keep=True),
    Run("stage1_jvp", "gmm_stage1", 4000, ("stage1.derivative=jvp",), "teacher", "Stage 1, exact JVP"),
    Run("stage1_eps1", "gmm_stage1", 4000, ("stage1.epsilon=1.0",), "teacher", "Stage 1, central difference eps 1"),
    Run("stage1_power1", "gmm_stage1", 4000, ("stage1.rebalance_power=1.0",), "teacher",
        "Stage 1, official rebalance power 1"),
    Run("stage2", "gmm_stage2", 4000, (), "stage1", "Stage 2 (gradient through every segment, co-trained)"),
    Run("stage2_one", "gmm_stage2", 4000, ("stage2.rollout_grad=one",), "stage1",
        "Stage 2, gradient through the fine step only"),
    Run("stage2_no_cotrain", "gmm_stage2", 4000, ("stage2.cotrain_weight=0.0",), "stage1",
        "Stage 2, without the co-trained Stage-1 loss"),
    Run("cd", "gmm_consistency", 4000, (), "teacher", "consistency distillation (CD)"),
    Run("cbs", "gmm_cbs", 4000, (), "cd", "consistency backward simulation + DMD (Stage 2's budget)"),
    Run("far_stage1", "shapes_far_stage1", 800, (), None, "causal Stage 1 (teacher forcing; shapes world)"),
    Run("far_stage2", "shapes_far_stage2", 300, (), "far_stage1", "causal Stage 2 (on-policy: its own rollouts)"),
    # What in causal Stage 2 costs the late chunks: each run takes one ingredient away.
    Run("far_stage2_no_dmd", "shapes_far_stage2", 300, ("stage2.dmd_weight=0.0",), "far_stage1",
        "causal Stage 2 without DMD (co-trained loss only)"),
    Run("far_stage2_no_cotrain", "shapes_far_stage2", 300, ("stage2.cotrain_weight=0.0",), "far_stage1",
        "causal Stage 2 without the co-trained loss (DMD only)"),
    Run("far_stage2_unguided", "shapes_far_stage2", 300, ("stage2.real_guidance=0.0",), "far_stage1",
        "causal Stage 2, DMD toward the unguided teacher (CFG 1, not 4)"),
)
GMM_RUNS = tuple(r.name for r in RUNS if r.preset.startswith("gmm_") and r.name != "teacher")
CAUSAL_RUNS = ("far_stage1", "far_stage2", "far_stage2_no_dmd", "far_stage2_no_cotrain", "far_stage2_unguided")
STAGE2_PARTS = {"far_stage2_no_dmd": "DMD", "far_stage2_no_cotrain": "the co-trained loss",
                "far_stage2_unguided": "the teacher's guidance in DMD (CFG 4)"}   # run -> what it takes away
CAUSAL_TEACHER = "causal-world teacher (bidirectional, Euler, CFG 3)"
CAUSAL_SAMPLES, CAUSAL_TAIL = 128, 2    # the causal sweep's clips; chunks generated after the real history
BY_NAME = {r.name: r for r in RUNS}
TEACHER_ROW = "teacher Euler"


# --------------------------------------------------------------------------------------------------
# verdicts: rules fixed before the numbers, each returning (verdict, why)
# --------------------------------------------------------------------------------------------------
Curves = dict[str, list[float]]       # run name (or TEACHER_ROW) -> a value at each N of NS


@dataclass
class Measured:
    """What the report judges: the gmm runs' FD curves (and the teacher's Euler), the embedding norms of Fig. 7a
    (step, mean |e(t, r)|) per Stage-1 run with their pretrained reference, and the causal runs' exposure bias
    E per N (:mod:`anystep.evaluate.exposure_bias`) with its per-chunk rows."""

    curves: Curves
    norms: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    reference: float = float("nan")
    exposure: Curves = field(default_factory=dict)
    exposure_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    teacher_chunks: list[dict[str, Any]] = field(default_factory=list)   # per N: the causal teacher's chunk scores


def _log_mean(curve: Sequence[float]) -> float:
    """The geometric mean of a curve: one number per sampler, every N weighted alike."""
    return math.exp(sum(math.log(max(v, 1e-12)) for v in curve) / len(curve))


def _falls(curve: Sequence[float], slack: float = 0.25) -> bool:
    """Better at N = 32 than at N = 1, and no step up by more than ``slack`` (relative: sampling noise)."""
    return curve[-1] < curve[0] and all(b <= a * (1 + slack) for a, b in itertools.pairwise(curve))


def _grade(checks: list[tuple[bool, str]]) -> tuple[str, str]:
    held = sum(ok for ok, _ in checks)
    verdict = "reproduces" if held == len(checks) else "partly" if held else "does not reproduce"
    return verdict, "; ".join(f"{'yes' if ok else 'NO'}: {what}" for ok, what in checks)


def verdict_step_scaling(m: Measured) -> tuple[str, str]:
    c = m.curves
    s1, s2, cd, cbs, teacher = c["stage1"], c["stage2"], c["cd"], c["cbs"], c[TEACHER_ROW]
    few = range(3)   # N = 1, 2, 4
    return _grade([
        (_falls(s1), "the Stage-1 flow map improves with N (N=32 below N=1, no rise over 25%)"),
        (all(s1[i] < teacher[i] for i in few), "Stage 1 beats the teacher's Euler sampler at N <= 4"),
        (all(s2[i] <= min(cd[i], cbs[i]) * 1.25 for i in few),
         "Stage 2 matches (within 25%) or beats both consistency baselines at N <= 4"),
        (s2[-1] <= s2[2] * 1.25, "Stage 2 keeps its quality or improves from N=4 to N=32 (within 25%)"),
        (min(cd) < cd[-1] / 1.5, "the consistency baseline gets worse with many steps (N=32 1.5x above its best)"),
    ])


def _best_of(c: Curves, names: Sequence[str]) -> str:
    return min(names, key=lambda n: _log_mean(c[n]))


def verdict_time_weight(m: Measured) -> tuple[str, str]:
    c = m.curves
    names = ("stage1", "stage1_uniform", "stage1_normal")
    ranked = sorted(names, key=lambda n: _log_mean(c[n]))
    verdict = "reproduces" if ranked[0] == "stage1" else "partly" if ranked[1] == "stage1" else "does not reproduce"
    return verdict, "geometric mean FD over N: " + ", ".join(f"{BY_NAME[n].label}: {_log_mean(c[n]):.4g}"
                                                             for n in ranked)


def verdict_embedding(m: Measured) -> tuple[str, str]:
    c, norms, reference = m.curves, m.norms, m.reference
    zero, copy = norms.get("stage1_zero_init"), norms.get("stage1")
    drift = {k: abs(v[-1][1] / v[0][1] - 1) for k, v in (("zero", zero), ("copy", copy)) if v}
    checks = [(_log_mean(c["stage1"]) < _log_mean(c["stage1_zero_init"]),
               (f"the interpolated (copied) r embedding trains a better flow map (geometric mean FD "
               f"{_log_mean(c['stage1']):.4g} vs {_log_mean(c['stage1_zero_init']):.4g})"))]
    if len(drift) == 2:
        checks.append((drift["zero"] > drift["copy"],
                       (f"the zero-initialised embedding's norm moves further from where it started (|final / "
                       f"start - 1|: zero {drift['zero']:.3f} vs copied {drift['copy']:.3f}; pretrained |E(t)| "
                       f"{reference:.4g})")))
    return _grade(checks)


def _ratio_close(a: Sequence[float], b: Sequence[float], within: float = 1.25) -> bool:
    return max(_log_mean(a), _log_mean(b)) / min(_log_mean(a), _log_mean(b)) <= within


def verdict_derivative(m: Measured) -> tuple[str, str]:
    c = m.curves
    return _grade([
        (_ratio_close(c["stage1"], c["stage1_jvp"]), (f"central difference (eps 5) within 25% of the exact JVP "
         f"(geometric mean FD {_log_mean(c['stage1']):.4g} vs {_log_mean(c['stage1_jvp']):.4g})")),
        (_ratio_close(c["stage1"], c["stage1_eps1"]), (f"eps 5 within 25% of eps 1 ({_log_mean(c['stage1']):.4g} "
         f"vs {_log_mean(c['stage1_eps1']):.4g})")),
    ])


def verdict_rollout_grad(m: Measured) -> tuple[str, str]:
    c = m.curves
    return _grade([(_log_mean(c["stage2"]) <= _log_mean(c["stage2_one"]),
                    (f"gradient through every segment is at least as good as the fine step only (geometric mean FD "
                    f"{_log_mean(c['stage2']):.4g} vs {_log_mean(c['stage2_one']):.4g})"))])


def verdict_cotrain(m: Measured) -> tuple[str, str]:
    c = m.curves
    return _grade([(c["stage2"][-1] <= c["stage2_no_cotrain"][-1] * 1.1,
                    (f"the co-trained Stage-1 loss keeps many-step (N=32) quality: {c['stage2'][-1]:.4g} vs "
                    f"{c['stage2_no_cotrain'][-1]:.4g} without it"))])


def verdict_rebalance(m: Measured) -> tuple[str, str]:
    c = m.curves
    better = _log_mean(c["stage1"]) < _log_mean(c["stage1_power1"])
    return ("departure measured", (f"power 0.5 (this world's default) {'beats' if better else 'does not beat'} the "
            f"official power 1: geometric mean FD {_log_mean(c['stage1']):.4g} vs {_log_mean(c['stage1_power1']):.4g}"))


def verdict_rollouts(m: Measured) -> tuple[str, str]:
    c = m.curves
    return _grade([(all(a <= b for a, b in zip(c["stage2"], c["cbs"])),
                    ("flow-map backward simulation + DMD beats consistency backward simulation + DMD at every N "
                    "(both from their own Stage-1-like start, DMD against the same exact teacher)"))])


def verdict_exposure(m: Measured) -> tuple[str, str]:
    s1, s2 = m.exposure["far_stage1"], m.exposure["far_stage2"]
    return _grade([
        (max(s1) > 0.01, (f"the teacher-forced (Stage 1) causal student shows exposure bias: E > 0.01 at some N "
                         f"(max {max(s1):+.3f})")),
        (all(b < a for a, b in zip(s1, s2)), ("Stage 2 (trained on its own rollouts) has less exposure bias than "
                                             "Stage 1 at every N")),
    ])


@dataclass(frozen=True)
class Claim:
    key: str
    paper: str
    rows: tuple[str, ...]
    verdict: Callable[[Measured], tuple[str, str]]
    measure: str = "curves"          # the Measured field holding the rows' values per N
    ylabel: str = "FD to the exact moments (lower is better)"


CLAIMS: tuple[Claim, ...] = (
    Claim("step scaling", "Fig. 1 / Table 2: the flow-map student improves with more steps, matches or beats "
          "consistency baselines in the few-step regime and keeps improving up to 32 NFEs; consistency models do "
          "not", ("stage1", "stage2", "cd", "cbs", TEACHER_ROW), verdict_step_scaling),
    Claim("time weight", "Fig. 6b: w(t) = Beta(2, 1.5) gives the best overall step scaling (vs uniform, Normal)",
          ("stage1", "stage1_uniform", "stage1_normal"), verdict_time_weight),
    Claim("embedding init", "Fig. 7: interpolated (copied) r conditioning beats a zero-initialised r projection, "
          "whose embedding norm grows away from the pretrained one", ("stage1", "stage1_zero_init"),
          verdict_embedding),
    Claim("derivative", "Sec. 3 / official code: the central difference (eps = 5 timesteps) stands in for the "
          "exact derivative", ("stage1", "stage1_jvp", "stage1_eps1"), verdict_derivative),
    Claim("rollout gradient", "Stage 2 backpropagates through every rollout segment (official)",
          ("stage2", "stage2_one"), verdict_rollout_grad),
    Claim("co-trained loss", "Stage 2 keeps the Stage-1 loss co-trained so that many-step sampling stays good",
          ("stage2", "stage2_no_cotrain"), verdict_cotrain),
    Claim("flow map vs consistency rollouts", "Flow-map backward simulation beats consistency backward simulation "
          "at equal budget", ("stage2", "cbs"), verdict_rollouts),
    Claim("exposure bias", "Sec. 5: on-policy training (Stage 2 on the causal model's own rollouts) reduces exposure "
          "bias, the quality lost when a causal model continues its own history instead of a real one",
          CAUSAL_RUNS, verdict_exposure, "exposure",
          "E = late-chunk quality, real history - own (lower is better)"),
    Claim("rebalance power", "(a departure of this world, not a paper claim) Stage 1's adaptive rebalance power "
          "0.5 vs the official 1", ("stage1", "stage1_power1"), verdict_rebalance),
)
NOT_MEASURED = (
    ("training cost", "Table 4: Stage 1 and Stage 2 cost per iteration", "benchmarks/training_cost.py measures it"),
    ("video step scaling", "Fig. 1 / Table 2 on video", ("the fine shapes teacher's students (about 4x the demo's cost "
     "per step) are not trained here; the teacher's own sweep is in the README, the demo's coarse world's students "
     "in its demo table")),
)


# --------------------------------------------------------------------------------------------------
# training the runs
# --------------------------------------------------------------------------------------------------
def run_config(run: Run, out: Path, quick: bool):
    """A run's config: its preset, its switches, its folder and budget, one thread, its init's folder."""
    steps = max(QUICK_MIN_STEPS, run.steps // QUICK_DIVISOR) if quick else run.steps
    extra = [f"model.init={out / 'runs' / run.init}"] if run.init else []
    if run.keep:
        extra += ["train.keep_checkpoints=0", f"train.checkpoint_every={max(1, steps // 8)}"]
    if quick:
        extra += ["validation.every=0", (f"optim.{'teacher' if run.preset.endswith('teacher') else 'student'}"
                  ".warmup_steps=0")]
    return resolve(run.preset, [f"train.out_dir={out / 'runs' / run.name}", f"train.steps={steps}",
                                "train.threads=1", *run.overrides, *extra])


def finished(cfg) -> bool:
    ckpt = newest_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
    return ckpt is not None and int(ckpt.name.split("_")[-1]) >= cfg.train.steps


def _train_one(run: Run, out: Path, quick: bool) -> float:
    from .train import train

    torch.set_flush_denormal(True)
    cfg = run_config(run, out, quick)
    start = time.time()
    train(cfg, progress=False, resume_if_present=True, preset=run.preset, overrides=list(run.overrides))
    return time.time() - start


def train_all(out: Path, quick: bool, jobs: int, log: Callable[[str], None] = print) -> dict[str, float]:
    """Train every run not finished yet, ``jobs`` at a time, each once the run it starts from is done; the
    seconds each took (0 for one reused)."""
    import multiprocessing as mp

    seconds = {r.name: 0.0 for r in RUNS if finished(run_config(r, out, quick))}
    todo = [r for r in RUNS if r.name not in seconds]
    if seconds:
        log(f"reusing {len(seconds)} finished run(s): {', '.join(seconds)}")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        running: dict[Any, Run] = {}
        while todo or running:
            for run in [r for r in todo if all(d in seconds for d in r.after())][:jobs - len(running)]:
                todo.remove(run)
                log(f"training {run.name} ({run.label or run.preset})")
                running[pool.submit(_train_one, run, out, quick)] = run
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                seconds[run.name] = future.result()      # a failed run raises here, naming itself below
                log(f"  {run.name} done in {seconds[run.name]:.0f} s")
    return seconds


# --------------------------------------------------------------------------------------------------
# measuring and reporting
# --------------------------------------------------------------------------------------------------
def curves(out: Path, quick: bool) -> tuple[Curves, list[dict[str, Any]]]:
    """Every gmm run (but the teacher) swept at NS on one evaluation set, with the exact teacher's Euler row."""
    from .sweep import sweep

    result = sweep([str(out / "runs" / n) for n in GMM_RUNS], labels=GMM_RUNS, out=out / "sweep", progress=False,
                   settings={"steps": NS, "num_samples": QUICK_SAMPLES if quick else FULL_SAMPLES})
    table: Curves = {}
    for row in result.rows:
        name = TEACHER_ROW if row["sampler"].startswith("teacher") else row["sampler"]
        table.setdefault(name, []).append(float(row[METRIC]))
    return table, result.rows


def embedding_norms(out: Path) -> tuple[dict[str, list[tuple[int, float]]], float]:
    """Fig. 7a: the mean norm of the timestep embedding e(t, r) = (1 - g) E_t(t) + g E_r(r) over a fixed grid of
    (t, r), r < t, for the Stage-1 runs with a copied and a zero-initialised r embedding: at the start (from the
    teacher's weights: E_t = E_r = E, resp. E_t = E / (1 - g) and E_r = 0, i.e. e = E(t)) and at every kept
    checkpoint; and the pretrained velocity network's mean |E(t)| on the same t (the reference line)."""
    from ..api import load

    t = torch.linspace(50.0, 1000.0, 20).repeat_interleave(4)
    r = t * torch.tensor([0.0, 0.25, 0.5, 0.75]).repeat(20)
    embed = load(out / "runs" / "teacher").network.time_embedder
    norms = {}
    with torch.no_grad():
        reference = embed(t).norm(dim=1).mean().item()
        for name in ("stage1", "stage1_zero_init"):
            nets = [(int(c.name.split("_")[-1]), load(c).network)
                    for c in complete_checkpoints(out / "runs" / name / "checkpoints")]
            g = nets[0][1].gate
            start = reference if name == "stage1_zero_init" else ((1 - g) * embed(t) + g * embed(r)).norm(dim=1).mean()
            norms[name] = [(0, float(start))] + [(step, net.embed_times(t, r).norm(dim=1).mean().item())
                                                 for step, net in nets]
    return norms, reference


def _kept(cache: Path, key: dict[str, Any], measure: Callable[[], Any]) -> Any:
    """``measure()``'s result, kept in ``cache`` (JSON) with what it was measured on (``key``) and reused while that
    is unchanged."""
    import json

    if cache.is_file() and (kept := json.loads(cache.read_text())).get("measured_on") == key:
        return kept["rows"]
    rows = measure()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"measured_on": key, "rows": rows}, indent=1) + "\n")
    return rows


def causal_clips(quick: bool) -> int:
    """How many clips the causal measurements use."""
    return QUICK_SAMPLES // 25 if quick else CAUSAL_SAMPLES


def exposure(out: Path, quick: bool) -> dict[str, list[dict[str, Any]]]:
    """Each causal run's exposure bias at NS (:func:`~anystep.evaluate.exposure_bias.exposure_bias`): its own
    rollouts against its continuations of the real clips (all but the last ``CAUSAL_TAIL`` chunks given), on the
    sweep's evaluation set (seed and shift of the run's ``sweep`` settings). Each run's rows are kept in
    ``out/exposure/<run>.json`` with what they were measured on (the checkpoint, the clips, N, the tail) and
    reused while that is unchanged."""
    from ..api import load
    from ..build import build_world
    from ..evaluate.exposure_bias import exposure_bias

    def measure(name: str) -> list[dict[str, Any]]:
        model = load(out / "runs" / name)
        world, sweep_cfg = build_world(model.config), model.config.sweep
        ev = world.eval_set(causal_clips(quick), sweep_cfg.seed)
        return exposure_bias(model.network, world.judge(), world.world.render(ev.meta), ev.noise, ev.cond, ev.meta,
                             NS, shift=sweep_cfg.shift, tail=CAUSAL_TAIL)

    rows = {}
    for name in CAUSAL_RUNS:
        key = {"checkpoint": str(newest_checkpoint(out / "runs" / name / "checkpoints")), "clips": causal_clips(quick),
               "steps": list(NS), "tail": CAUSAL_TAIL, "scores": "all"}
        rows[name] = _kept(out / "exposure" / f"{name}.json", key, lambda name=name: measure(name))
    return rows


def causal_teacher_chunks(out: Path, quick: bool) -> list[dict[str, Any]]:
    """The causal Stage 2's teacher (the bidirectional causal-world teacher that scores its rollouts) sampled by
    its Euler sampler with CFG at NS on the exposure clips, every per-chunk score: how good the late chunks are
    that DMD pulls the student toward. Kept in ``out/exposure/teacher.json`` like :func:`exposure`'s rows."""
    from ..api import load
    from ..build import build_world
    from ..evaluate.exposure_bias import chunk_scores
    from ..evaluate.sweep import Sampler, sample_batched

    student = load(out / "runs" / "far_stage2")
    spec = student.config.stage2.teacher
    if spec is None:
        raise ValueError("far_stage2 names no stage2.teacher: the report needs the teacher its DMD scored against")
    world, sweep_cfg = build_world(student.config), student.config.sweep

    def measure() -> list[dict[str, Any]]:
        ev = world.eval_set(causal_clips(quick), sweep_cfg.seed)
        sampler = Sampler("teacher", load(spec).network, sweep_cfg.teacher_guidance, "euler")
        partition = tuple(student.network.chunk_partition)
        return [{"N": n, "scores": chunk_scores(world.judge(), sample_batched(
                    sampler, world.null_cond, ev.noise, ev.cond, n, sweep_cfg.shift), ev.meta, partition)} for n in NS]

    key = {"teacher": spec, "clips": causal_clips(quick), "steps": list(NS), "guidance": sweep_cfg.teacher_guidance}
    return _kept(out / "exposure" / "teacher.json", key, measure)


def plot_claim(claim: Claim, c: Curves, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name in claim.rows:
        if name in c:
            ax.plot(NS, c[name], marker="o", label=BY_NAME[name].label if name in BY_NAME else name)
    ax.set(xscale="log", yscale="log" if claim.measure == "curves" else "linear", xlabel="sampling steps N",
           ylabel=claim.ylabel, title=claim.key)
    ax.set_xticks(NS, [str(n) for n in NS])
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_norms(norms: dict[str, list[tuple[int, float]]], reference: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for name, points in norms.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=BY_NAME[name].label)
    ax.axhline(reference, color="gray", ls="--", label="pretrained |E(t)|")
    ax.set(xlabel="training step", ylabel="mean |e(t, r)|", title="Fig. 7a: timestep embedding norm")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, quick: bool, m: Measured, seconds: dict[str, float]) -> str:
    """The markdown report: the verdict table, then per claim the paper's statement, the curves and the why."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    verdicts = []
    for claim in CLAIMS:
        verdict, why = claim.verdict(m)
        verdicts.append((claim, "quick mode: not a measurement" if quick else verdict, why))
        plot_claim(claim, getattr(m, claim.measure), out / "plots" / f"{claim.key.replace(' ', '_')}.png")
    plot_norms(m.norms, m.reference, out / "plots" / "embedding_norm.png")
    lines = ["# What the paper claims, measured on the toy worlds", "",
             ("**Quick mode** (each run a fiftieth of its budget, 500 samples): the pipeline ran; the numbers and "
              "verdicts below measure nothing." if quick else
              f"Full budgets, one thread per run; sweep on {FULL_SAMPLES} samples (seed 0 of the sweep); the "
              "exact ODE scores about 0.004 at this sample size, and seeds of the sweep move an FD by up to ~2x "
              "at N = 1 (README, gmm section)."), "",
             "| claim | paper | verdict |", "|---|---|---|"]
    lines += [f"| {cl.key} | {cl.paper} | {v} |" for cl, v, _ in verdicts]
    lines += [f"| {key} | {paper} | not measured here: {why} |" for key, paper, why in NOT_MEASURED]
    header = "| sampler | " + " | ".join(f"N={n}" for n in NS) + " |"
    for claim, verdict, why in verdicts:
        values = getattr(m, claim.measure)
        lines += ["", f"## {claim.key}: {verdict}", "", claim.paper, "", f"Why: {why}", "", f"Values: {claim.ylabel}.",
                  "", header, "|---|" + "---:|" * len(NS)]
        lines += [f"| {BY_NAME[n].label if n in BY_NAME else n} | " + " | ".join(f"{v:.4g}" for v in values[n]) + " |"
                  for n in claim.rows if n in values]
        lines += ["", f"![{claim.key}](plots/{claim.key.replace(' ', '_')}.png)"]
        lines += EXTRAS.get(claim.key, lambda _: [])(m)
    lines += ["", "## Runs", "", ("| run | preset | switches | steps | seconds trained by the call that wrote this "
              "(0: reused) |"), "|---|---|---|---:|---:|"]
    lines += [f"| {r.name} | {r.preset} | {' '.join(r.overrides) or '-'} | "
              f"{run_config(r, out, quick).train.steps} | {seconds.get(r.name, 0):.0f} |" for r in RUNS]
    lines += ["", (f"Reproduce: `anystep reproduce{' --quick' if quick else ''}` (this report: `--out {out.name}`; finished "
              "runs in the folder are reused, delete a run's folder to retrain it).")]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _norm_lines(m: Measured) -> list[str]:
    return ["", f"Mean |e(t, r)| by training step (pretrained |E(t)| {m.reference:.4g}): " + "; ".join(
        f"{BY_NAME[k].label}: " + ", ".join(f"{s}: {v:.4g}" for s, v in pts) for k, pts in m.norms.items()),
        "", "![embedding norm](plots/embedding_norm.png)"]


def _exposure_lines(m: Measured) -> list[str]:
    """Per causal run and N: the per-chunk quality of its own rollout and of its continuation of real clips."""
    lines = ["", (f"Per-chunk quality (mean over the clips; the last {CAUSAL_TAIL} chunks generated after the real "
             "history in the continuation):"), "", "| run | N | own rollout, per chunk | continued from real, per chunk |",
             "|---|---:|---|---|"]
    for name, rows in m.exposure_rows.items():
        lines += [f"| {name} | {r['N']} | {' '.join(f'{q:.3f}' for q in r['own_chunks'])} | "
                  f"{' '.join(f'{q:.3f}' for q in r['continued_chunks'])} |" for r in rows]
    return lines


LATE_SCORES = ("quality", "background", "consistency", "smoothness", "direction", "drift")


def _late(scores: dict[str, list[float]], key: str) -> float:
    return sum(scores[key][-CAUSAL_TAIL:]) / CAUSAL_TAIL


def late_after_real(m: Measured, name: str) -> float:
    """A causal run's late-chunk quality after the real history, averaged over NS (E's first term)."""
    rows = m.exposure_rows[name]
    return sum(r["late_continued"] for r in rows) / len(rows)


def stage2_diagnosis(m: Measured) -> list[str]:
    """Which ingredient of causal Stage 2 costs the late chunks: for each run that takes one away, the share of
    Stage 2's loss in late-chunk quality after real history (Stage 1 minus Stage 2, averaged over N) it recovers
    (100%: back to Stage 1; 0%: as Stage 2; negative: worse than Stage 2)."""
    s1, s2 = late_after_real(m, "far_stage1"), late_after_real(m, "far_stage2")
    lost = s1 - s2
    lines = [f"Late-chunk quality after the real history, mean over N: Stage 1 {s1:.3f}, Stage 2 {s2:.3f}."]
    if lost <= 0.005:
        return lines + ["Stage 2 does not lower it (by more than 0.005): nothing to attribute."]
    shares = {}
    for name, part in STAGE2_PARTS.items():
        if name in m.exposure_rows:
            shares[part] = (late_after_real(m, name) - s2) / lost
            lines.append(f"Without {part}: {late_after_real(m, name):.3f}, {100 * shares[part]:.0f}% of Stage 2's "
                         "loss recovered.")
    if shares:
        part, share = max(shares.items(), key=lambda kv: kv[1])
        lines.append(f"The ingredient whose removal recovers most: {part} ({100 * share:.0f}%)." if share >= 0.5 else
                     f"No single ingredient's removal recovers half of it (best: {part}, {100 * share:.0f}%).")
    return lines


def _diagnosis_lines(m: Measured) -> list[str]:
    """What Stage 2 changes in the late chunks (each per-chunk score, after the real history) and which ingredient
    does it, beside the teacher's own late chunks."""
    if "far_stage1" not in m.exposure_rows or "far_stage2" not in m.exposure_rows:
        return []
    lines = ["", "### What Stage 2 changes in the late chunks, and which ingredient does it", "",
             (f"Mean over the last {CAUSAL_TAIL} chunks of each per-chunk score (the per-chunk judge), the students "
              f"continued from the real history, the teacher on its own samples ({CAUSAL_TEACHER}):"), "",
             "| run | N | " + " | ".join(LATE_SCORES) + " |", "|---|---:|" + "---:|" * len(LATE_SCORES)]
    for n in (NS[2], NS[-1]):
        for name, rows in m.exposure_rows.items():
            r = next(r for r in rows if r["N"] == n)
            lines.append(f"| {BY_NAME[name].label} | {n} | "
                         + " | ".join(f"{_late(r['continued_scores'], k):.3f}" for k in LATE_SCORES) + " |")
        t = next((r for r in m.teacher_chunks if r["N"] == n), None)
        if t is not None:
            lines.append(f"| {CAUSAL_TEACHER} | {n} | " + " | ".join(f"{_late(t['scores'], k):.3f}" for k in LATE_SCORES)
                         + " |")
    return lines + [""] + stage2_diagnosis(m)


def _exposure_all(m: Measured) -> list[str]:
    return _exposure_lines(m) + _diagnosis_lines(m)


EXTRAS: dict[str, Callable[[Measured], list[str]]] = {"embedding init": _norm_lines, "exposure bias": _exposure_all}


def reproduce(out: str | Path = "runs/reproduce", quick: bool = False, jobs: int = 2,
              log: Callable[[str], None] = print) -> Path:
    """Train what is missing, sweep, measure the embedding norms, write ``out/report.md``; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    seconds = train_all(out, quick, max(1, jobs), log)
    log("sweeping every run at N = " + ", ".join(map(str, NS)))
    c, _ = curves(out, quick)
    norms, reference = embedding_norms(out)
    log("measuring the causal students' exposure bias")
    rows = exposure(out, quick)
    measured = Measured(c, norms, reference, {k: [r["exposure_bias"] for r in v] for k, v in rows.items()}, rows,
                        causal_teacher_chunks(out, quick))
    report(out, quick, measured, seconds)
    log(f"report: {out / 'report.md'} ({time.time() - start:.0f} s)")
    return out / "report.md"
