"""``anystep reproduce``: the verdict rules on made-up curves (each rule can say yes and no), and the quick mode
end to end: every run trained in dependency order, one sweep, a report whose numbers are the sweep's, reuse."""

import csv

import pytest

from anystep.cli import main
from anystep.recipes import reproduce as rp

FALLING, FLAT, U_SHAPED = [0.2, 0.1, 0.06, 0.03, 0.02, 0.018], [0.01] * 6, [0.02, 0.02, 0.03, 0.04, 0.06, 0.1]


def _curves(**changes):
    c = {"stage1": FALLING, "stage2": FLAT, "cd": U_SHAPED, "cbs": U_SHAPED, rp.TEACHER_ROW: [3, 1.5, 0.4, 0.1, 0.06, 0.02]}
    return {**c, **changes}


def test_step_scaling_verdict_follows_its_rule():
    assert rp.verdict_step_scaling(rp.Measured(_curves()))[0] == "reproduces"
    verdict, why = rp.verdict_step_scaling(rp.Measured(_curves(stage1=list(reversed(FALLING)))))    # Stage 1 gets worse with N
    assert verdict == "partly" and "NO: the Stage-1 flow map improves with N" in why
    assert rp._falls([1.0, 1.2, 0.5]) and not rp._falls([1.0, 1.3, 0.5])   # a rise over 25% breaks "falls"
    nothing = _curves(stage1=[1.0] * 6, stage2=[1.0] * 5 + [2.0], cd=[0.1] * 6, cbs=[0.1] * 6, **{rp.TEACHER_ROW: [0.5] * 6})
    assert rp.verdict_step_scaling(rp.Measured(nothing))[0] == "does not reproduce"


def test_ablation_verdicts_follow_their_rules():
    c = {"stage1": [0.1] * 6, "stage1_uniform": [0.2] * 6, "stage1_normal": [0.05] * 6}
    verdict, why = rp.verdict_time_weight(rp.Measured(c))
    assert verdict == "partly" and why.index("Normal") < why.index("Beta")      # ranked, best first
    assert rp.verdict_time_weight(rp.Measured({**c, "stage1_normal": [0.3] * 6}))[0] == "reproduces"
    assert rp.verdict_derivative(rp.Measured({"stage1": [0.1] * 6, "stage1_jvp": [0.12] * 6, "stage1_eps1": [0.2] * 6}))[0] == "partly"
    assert rp.verdict_cotrain(rp.Measured({"stage2": [0.01] * 6, "stage2_no_cotrain": [0.02] * 6}))[0] == "reproduces"
    assert rp.verdict_cotrain(rp.Measured({"stage2": [0.03] * 6, "stage2_no_cotrain": [0.02] * 6}))[0] == "does not reproduce"
    norms = {"stage1": [(0, 1.0), (100, 1.05)], "stage1_zero_init": [(0, 1.2), (100, 2.4)]}
    c7 = {"stage1": [0.1] * 6, "stage1_zero_init": [0.2] * 6}
    assert rp.verdict_embedding(rp.Measured(c7, norms, 1.2))[0] == "reproduces"
    flipped = {"stage1": [(0, 1.0), (100, 3.0)], "stage1_zero_init": [(0, 1.2), (100, 1.2)]}
    assert rp.verdict_embedding(rp.Measured(c7, flipped, 1.2))[0] == "partly"
    biased = {"far_stage1": [0.0, 0.02, 0.05, 0.06, 0.06, 0.07], "far_stage2": [0.0, 0.01, 0.02, 0.03, 0.03, 0.03]}
    assert rp.verdict_exposure(rp.Measured({}, exposure=biased))[0] == "partly"      # N=1: not less (equal)
    biased["far_stage2"][0] = -0.01
    assert rp.verdict_exposure(rp.Measured({}, exposure=biased))[0] == "reproduces"
    grown = {"far_stage1": [0.02] * 6, "far_stage2": [0.05] * 6}
    verdict, why = rp.verdict_exposure(rp.Measured({}, exposure=grown))
    assert verdict == "partly" and "NO: Stage 2" in why


def _late_rows(late: float) -> list[dict]:
    return [{"N": n, "late_continued": late} for n in rp.NS]


def test_stage2_diagnosis_names_the_ingredient_whose_removal_recovers_most():
    rows = {"far_stage1": _late_rows(0.65), "far_stage2": _late_rows(0.45), "far_stage2_no_dmd": _late_rows(0.63),
            "far_stage2_no_cotrain": _late_rows(0.40), "far_stage2_unguided": _late_rows(0.50)}
    lines = rp.stage2_diagnosis(rp.Measured({}, exposure_rows=rows))
    assert "Without DMD: 0.630, 90% of Stage 2's loss recovered." in lines
    assert "Without the co-trained loss: 0.400, -25% of Stage 2's loss recovered." in lines
    assert lines[-1] == "The ingredient whose removal recovers most: DMD (90%)."
    rows["far_stage2_no_dmd"] = _late_rows(0.48)
    assert rp.stage2_diagnosis(rp.Measured({}, exposure_rows=rows))[-1].startswith(
        "No single ingredient's removal recovers half of it (best: the teacher's guidance in DMD (CFG 4), 25%)")
    rows["far_stage2"] = _late_rows(0.66)                               # Stage 2 costs nothing: nothing to attribute
    assert rp.stage2_diagnosis(rp.Measured({}, exposure_rows=rows))[-1].startswith("Stage 2 does not lower it")


def test_runs_start_from_runs_that_come_earlier():
    names = [r.name for r in rp.RUNS]
    for run in rp.RUNS:
        assert run.init is None or names.index(run.init) < names.index(run.name), run.name


@pytest.mark.slow
def test_quick_mode_writes_a_report_of_the_sweeps_numbers_and_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "rq"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for claim in rp.CLAIMS:
        assert f"| {claim.key} | {claim.paper} | quick mode: not a measurement |" in report
        assert (out / "plots" / f"{claim.key.replace(' ', '_')}.png").stat().st_size > 0
    assert "| training cost |" in report and (out / "plots" / "embedding_norm.png").is_file()
    assert "| far_stage2 | 32 |" in report                              # the per-chunk exposure rows
    for run in rp.CAUSAL_RUNS:                                          # every causal run's late chunks, N = 4 and 32
        assert f"| {rp.BY_NAME[run].label} | 32 | " in report and f"| {rp.BY_NAME[run].label} | 4 | " in report
    assert f"| {rp.CAUSAL_TEACHER} | 32 | " in report and "Late-chunk quality after the real history" in report
    with open(out / "sweep" / "sweep.csv") as f:       # the report's numbers are the sweep's
        rows = list(csv.DictReader(f))
    stage2 = [float(r["fd"]) for r in rows if r["sampler"] == "stage2"]
    assert len(stage2) == len(rp.NS)
    assert "| Stage 2 (gradient through every segment, co-trained) | " + " | ".join(f"{v:.4g}" for v in stage2) in report
    capsys.readouterr()
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0      # everything finished: nothing retrained
    assert f"reusing {len(rp.RUNS)} finished run(s)" in capsys.readouterr().out


def test_exposure_bias_continues_the_real_history_it_is_given():
    """exposure_bias: the continuation keeps the real clips' first chunks as they are (they score what the real
    clips score on those chunks, by the judge called independently here), generates the last ``tail`` chunks,
    and E is the late chunks' quality after the real history minus after the student's own."""
    import torch

    from anystep.api import load
    from anystep.build import build_world
    from anystep.config import resolve
    from anystep.evaluate.exposure_bias import exposure_bias
    from anystep.models import zoo

    cfg = resolve("shapes_far_stage1")
    world, teacher = build_world(cfg), load("shipped:shapes_far_teacher").network
    student = zoo.causal_student_from(teacher, cfg.model.causal)
    ev = world.eval_set(4, 0)
    real, judge = world.world.render(ev.meta), world.judge()
    rows = exposure_bias(student, judge, real, ev.noise, ev.cond, ev.meta, (1, 2), shift=5.0, tail=2)
    expected = judge.judge_chunks(real, ev.meta, (1, 2, 2, 2, 2))["quality"].mean(0)
    for r in rows:
        assert len(r["own_chunks"]) == 5 and torch.allclose(torch.tensor(r["continued_chunks"][:3]), expected[:3])
        assert r["exposure_bias"] == pytest.approx(r["late_continued"] - r["late_own"])
        assert r["late_own"] == pytest.approx(sum(r["own_chunks"][-2:]) / 2)
        real_scores = judge.judge_chunks(real, ev.meta, (1, 2, 2, 2, 2))      # every score, not just quality
        assert set(r["continued_scores"]) == set(real_scores) and r["own_scores"]["quality"] == r["own_chunks"]
        for key, v in real_scores.items():
            assert torch.allclose(torch.tensor(r["continued_scores"][key][:3]), v.mean(0)[:3]), key
    with pytest.raises(ValueError, match="tail"):
        exposure_bias(student, judge, real, ev.noise, ev.cond, ev.meta, (1,), shift=5.0, tail=5)
