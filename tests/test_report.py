"""``anystep report RUN`` on every kind of run (teacher, Stage 1, Stage 2, consistency, CBS; gmm and shapes; the
wan world's runs are in test_wan_chain.py), on runs killed midway, still training, given as a checkpoint folder
or shipped, and on a hand-made validation folder. Figures are checked against the run folder's own files read
here (metrics.csv, the presets) and against hand-computed bests; the commands it prints are run."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil

import pytest
import yaml

from anystep.cli import main
from anystep.config import load_preset
from anystep.recipes import report
from anystep.train.checkpoint import lock_run_folder

GMM = ["world.name=gmm", "train.batch_size=16", "train.steps=2", "train.log_every=1", "train.checkpoint_every=1"]
NET = ["model.network.hidden=32", "model.network.depth=1", "optim.teacher.warmup_steps=1"]
WARM = ["optim.student.warmup_steps=1"]
DMD = ["dmd_batch_size=8", "rollout_steps=[2,4]"]
# kind -> (preset, the run it starts from, its own overrides)
CHAIN = {
    "teacher": ("gmm_teacher", None, NET),
    "stage1": ("gmm_stage1", "teacher", WARM),
    "stage2": ("gmm_stage2", "stage1", [f"stage2.{o}" for o in DMD]),
    "consistency": ("gmm_consistency", "teacher", WARM),
    "cbs": ("gmm_cbs", "consistency", [f"cbs.{o}" for o in DMD] + ["train.log_every=2"]),
}


def _overrides(runs, kind) -> list[str]:
    _, init, own = CHAIN[kind]
    return [f"train.out_dir={runs / kind}", *GMM, *own, *([f"model.init={runs / init}"] if init else [])]


@pytest.fixture(scope="module")
def gmm(tmp_path_factory):
    """One tiny gmm run of every kind (2 steps, a checkpoint each step), through the CLI."""
    runs = tmp_path_factory.mktemp("runs")
    for kind, (preset, _, _) in CHAIN.items():
        assert main([kind, "--config", preset, "--no-progress", *_overrides(runs, kind)]) == 0
    return runs


def _metrics(run) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _command(markdown: str, name: str) -> list[str]:
    """The argv of the report's ``- name: `...` `` command line (``anystep`` dropped)."""
    line = re.search(rf"^- {name}[^`]*`([^`]*)`", markdown, re.MULTILINE).group(1)
    argv = shlex.split(line)
    assert argv[0] == "anystep"
    return argv[1:]


def _flat(data, prefix=""):
    if isinstance(data, dict):
        return {k: v for key, sub in data.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


@pytest.mark.parametrize("kind", list(CHAIN))
def test_report_of_every_gmm_kind(gmm, kind, capsys):
    run = gmm / kind
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert text in out and f"written: {run / 'report.md'}" in out
    assert f"kind: **{kind}**" in text and "world: **gmm**" in text and f"preset: `{CHAIN[kind][0]}`" in text
    # the diff from the preset: exactly the overrides that change a preset value (read from the preset file)
    preset, overrides = _flat(load_preset(CHAIN[kind][0])), dict(o.split("=", 1) for o in _overrides(gmm, kind))
    changed = {k for k, v in overrides.items() if k not in preset or str(preset[k]) != v}
    listed = set(re.findall(r"^\| `([\w.]+)` \|", text.split("## Config")[1].split("##")[0], re.MULTILINE))
    assert listed == changed
    assert f"| `train.steps` | {preset['train.steps']} | 2 |" in text
    # progress and the last losses, as metrics.csv has them
    assert "steps: 2 logged (metrics.csv), 2 in the newest checkpoint; 2 planned" in text
    assert "status: finished" in text
    last = _metrics(run)[-1]
    for key, value in last.items():
        if key.startswith("loss/"):
            assert f"| `{key}` | {float(value):.6g} |" in text
    log_every = int(overrides["train.log_every"])    # each row: the time since the last row / log_every
    seconds = sum(float(r["time/sec_per_step"]) for r in _metrics(run)) * log_every
    assert f"training time: {seconds:.1f} s for 2 steps, {2 / seconds:.3g} steps/s" in text
    assert "1 validation step(s), the latest at step 2; primary metric `fd` (lower is better)" in text  # at the end
    assert f"checkpoints: `{run / 'checkpoints' / 'step_000002'}` (newest; kept: step_000002, step_000001)" in text
    assert f"tensorboard --logdir {run / 'tensorboard'}" in text
    assert "export: not for this run: it is a 'gmm'-world run" in text
    assert _command(text, "resume") == [kind, "--config", str(run / "config.yaml"), f"train.out_dir={run}",
                                        "--resume"]
    assert _command(text, "sample") == ["sample", str(run), "--steps", "4"]


def test_the_printed_resume_command_continues_the_run(gmm, tmp_path, monkeypatch):
    run = tmp_path / "stage1"
    shutil.copytree(gmm / "stage1", run)
    argv = _command(report(run).markdown, "resume")
    assert main([*argv, "train.steps=3", "--no-progress"]) == 0
    assert (run / "checkpoints" / "step_000003").is_dir()
    assert [r["step"] for r in _metrics(run)] == ["1", "2", "3"]
    again = report(run).markdown
    assert "preset: `gmm_stage1`" in again          # the resumed run keeps where it came from
    origin = yaml.safe_load((run / "origin.yaml").read_text())
    assert origin["processes"] == 1 and origin["overrides"] == _overrides(gmm, "stage1")
    assert "| `train.steps` | 4000 | 3 |" in again and "3 in the newest checkpoint; 3 planned" in again
    # from another folder, the commands go back to where the run was started (its relative paths hold there)
    started = yaml.safe_load((run / "origin.yaml").read_text())["cwd"]
    monkeypatch.chdir(tmp_path)
    assert f"- resume: `cd {shlex.quote(started)} && anystep stage1 --config {run / 'config.yaml'}" in report(
        run).markdown
    (run / "origin.yaml").write_text(yaml.safe_dump({**origin, "processes": 2}))   # as a torchrun run records it
    assert f"- resume: `cd {shlex.quote(started)} && torchrun --nproc-per-node 2 -m anystep stage1" in report(
        run).markdown


def test_a_killed_run_and_one_still_training(gmm, tmp_path):
    run = tmp_path / "s1"
    shutil.copytree(gmm / "stage1", run)
    # what a kill after logging step 2 and before its checkpoint leaves (train.steps raised to 5 first)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["steps"] = 5
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.rmtree(run / "checkpoints" / "step_000002")
    (run / "checkpoints" / "latest").write_text("step_000001\n")
    text = report(run).markdown
    assert "steps: 2 logged (metrics.csv), 1 in the newest checkpoint; 5 planned" in text
    assert "status: stopped at step 2 of 5" in text
    assert f"checkpoints: `{run / 'checkpoints' / 'step_000001'}`" in text
    with lock_run_folder(run):
        assert "status: training now" in report(run).markdown
    # killed before its first checkpoint: resume when there is one, else start; nothing to sample yet
    shutil.rmtree(run / "checkpoints")
    text = report(run).markdown
    assert "no checkpoint yet" in text and "checkpoints: none yet" in text
    assert _command(text, "resume")[-1] == "--resume-if-present" and "sample / export: after the first" in text
    # killed before metrics.csv: still a report
    (run / "metrics.csv").unlink()
    text = report(run).markdown
    assert "none logged" in text and "no metrics.csv rows yet" in text and "not measured" in text


def test_a_checkpoint_folder_in_its_run_alone_or_shipped(gmm, tmp_path, capsys):
    ckpt = gmm / "teacher" / "checkpoints" / "step_000001"
    inside = report(ckpt, out=tmp_path / "r.md")
    assert inside.steps_done == 2 and "2 logged" in inside.markdown   # the run around it
    alone = tmp_path / "step_000001"
    shutil.copytree(ckpt, alone)
    text = report(alone).markdown
    assert (alone / "report.md").read_text() == text
    assert "a checkpoint on its own" in text and "preset: not recorded" in text
    assert "1 in the newest checkpoint" in text and "diffed against" not in text
    assert "the 'teacher' kind's defaults in the 'gmm' world (no preset recorded)" in text
    argv = _command(text, "continue in a new run folder")
    assert argv[-2:] == ["--resume-from", str(alone)]
    shipped = report("shipped:shapes_teacher")
    assert shipped.path is None and "world: **shapes**" in shipped.markdown and "kind: **teacher**" in shipped.markdown
    assert _command(shipped.markdown, "sample") == ["sample", "shipped:shapes_teacher", "--steps", "4"]
    # its network was sized by hand (model.network unset in the defaults): the keys, not a null, are listed
    assert "| `model.network.layers` | — | 4 |" in shipped.markdown and "`model.network` |" not in shipped.markdown
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no run at" in capsys.readouterr().err


def _validation(run, step, rows, primary="Total", higher=True):
    folder = run / "validation" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"step": step, "rows": rows, "primary_metric": primary,
                                                     "higher_is_better": higher}))
    (folder / "grid.mp4").write_bytes(b"")
    return folder


def test_best_validation_figures_per_n(gmm, tmp_path):
    run = tmp_path / "s2"
    shutil.copytree(gmm / "stage2", run)
    shutil.rmtree(run / "validation")   # the run's own (at its last step), replaced by these
    _validation(run, 2, [{"N": 1, "Total": 0.50, "Quality": 0.7}, {"N": 4, "Total": 0.90, "Quality": 0.95}])
    newest = _validation(run, 4, [{"N": 1, "Total": 0.60, "Quality": 0.6}, {"N": 4, "Total": 0.80, "Quality": 0.9},
                                  {"N": 2, "Total": float("nan")}])
    result = report(run)
    # by hand: N=1 improves at step 4, N=4 was best at step 2, N=2 has no finite figure
    assert {n: (b["step"], b["Total"], b["Quality"]) for n, b in result.best.items()} == {
        1: (4, 0.60, 0.6), 4: (2, 0.90, 0.95)}
    text = result.markdown
    assert "2 validation step(s), the latest at step 4; primary metric `Total` (higher is better)" in text
    assert "| 1 | 0.6 | 4 | 0.6 |" in text and "| 4 | 0.9 | 2 | 0.95 |" in text
    assert f"validation videos: `{newest / 'grid.mp4'}` (newest of 2)" in text
    # lower is better: the smallest wins
    shutil.rmtree(run / "validation")
    _validation(run, 2, [{"N": 1, "fd": 0.3}], "fd", False)
    _validation(run, 4, [{"N": 1, "fd": 0.5}], "fd", False)
    assert report(run).best[1]["step"] == 2


def test_report_of_shapes_runs(tmp_path):
    t, s = tmp_path / "t", tmp_path / "s"
    tiny = ["train.batch_size=4", "train.steps=2", "train.log_every=1", "train.tracker=none", "validation.every=0"]
    shapes_net = ["model.network.heads=2", "model.network.head_dim=8", "model.network.layers=1",
                  "model.network.ffn_dim=16", "optim.teacher.warmup_steps=1"]
    assert main(["teacher", "--no-progress", f"train.out_dir={t}", *tiny, *shapes_net]) == 0
    assert main(["stage1", "--no-progress", f"train.out_dir={s}", f"model.init={t}", *tiny, *WARM]) == 0
    for run, kind in ((t, "teacher"), (s, "stage1")):
        text = report(run).markdown
        assert f"kind: **{kind}**" in text and "world: **shapes**" in text and f"preset: `shapes_{kind}`" in text
        assert "2 in the newest checkpoint; 2 planned" in text and "tracker: none" in text
        assert "no validation yet" in text
        assert "| `train.tracker` | tensorboard | none |" in text
