"""A run's own report: what a user asks first about a run, as markdown (``anystep report RUN``).

From the run folder alone (no model is built): its kind, world and preset and how its config differs from that
preset; steps done and planned, training time and speed; the last losses; the best validation figures per N;
where its checkpoints, videos and tracker logs are; and the command lines that resume, sample and export it.
``RUN`` may be a run folder (finished, still training, or killed midway, with or without a checkpoint), one of
its checkpoints, a checkpoint folder on its own, or ``shipped:<name>``.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, RunConfig, parse_run, resolve, to_dict
from ..errors import UsageError
from ..lineage import SHIPPED_PREFIX, checkpoint_path, read_config
from ..train.checkpoint import CHECKPOINTS, complete_checkpoints, newest_checkpoint
from .export import not_exportable
from .train import ORIGIN, Origin, read_origin

REPORT = "report.md"
VALIDATION = "validation"
_STEP = re.compile(r"step_(\d+)$")


@dataclass
class RunFiles:
    """Where a report reads from: the run folder (None for a checkpoint on its own), the checkpoint the report
    is about (None before the first one), the config file and the name the user gave."""

    spec: str
    run: Path | None
    checkpoint: Path | None
    config_file: Path
    shipped: bool = False

    @property
    def folder(self) -> Path:
        """The folder the report is written into by default."""
        return self.run if self.run is not None else self.checkpoint


@dataclass
class Report:
    """A run's report: ``markdown`` (what is printed and written) and the figures it was made from."""

    markdown: str
    steps_done: int
    steps_planned: int
    best: dict[int, dict[str, Any]] = field(default_factory=dict)   # N -> {"step", metric: value, ...}
    path: Path | None = None


def report(spec: str | Path, out: str | Path | None = None) -> Report:
    """The report of run ``spec``, written to ``out`` (default ``RUN/report.md``; a shipped checkpoint's report is
    only returned unless ``out`` is given)."""
    files = locate(str(spec))
    cfg = read_config(files.config_file)
    origin = read_origin(files.run) if files.run is not None else None
    rows = read_metrics(files.run / "metrics.csv") if files.run is not None else []
    ckpt_step = checkpoint_step(files.checkpoint) if files.checkpoint is not None else None
    logged = int(rows[-1]["step"]) if rows else None
    done = max(s for s in (ckpt_step, logged, 0) if s is not None)
    validations = read_validations(files.run / VALIDATION) if files.run is not None else []
    best = best_per_n(validations)
    sections = [
        _header(files, cfg, origin),
        _config_section(cfg, origin, files),
        _progress_section(files, cfg, rows, ckpt_step, logged),
        _losses_section(rows),
        _validation_section(validations, best),
        _files_section(files, cfg, validations),
        _commands_section(files, cfg, origin, done),
    ]
    result = Report("\n\n".join(sections) + "\n", done, cfg.train.steps, best)
    target = Path(out) if out is not None else (None if files.shipped else files.folder / REPORT)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(result.markdown)
        result.path = target
    return result


# ------------------------------------------------------------------------------------------------- reading
def locate(spec: str) -> RunFiles:
    """The run folder and checkpoint ``spec`` names (a UsageError when it names neither)."""
    if spec.startswith(SHIPPED_PREFIX):
        ckpt = checkpoint_path(spec)
        return RunFiles(spec, None, ckpt, ckpt / "config.yaml", shipped=True)
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"no run at {path}: give a run folder (train.out_dir) or a checkpoint folder")
    if path.is_dir() and any(path.glob("*.safetensors")):   # a checkpoint folder
        run = path.parent.parent if path.parent.name == CHECKPOINTS else None
        run = run if run is not None and (run / "config.yaml").is_file() else None
        return RunFiles(spec, run, path, (run or path) / "config.yaml")
    if path.is_dir() and (path / "config.yaml").is_file():
        root = path / CHECKPOINTS
        return RunFiles(spec, path, newest_checkpoint(root) if root.is_dir() else None, path / "config.yaml")
    raise UsageError(f"{path} is not a run folder (no config.yaml: a run writes it when training starts) nor a "
                     "checkpoint folder (step_* with .safetensors files)")


def read_metrics(path: Path) -> list[dict[str, float]]:
    """``metrics.csv`` as rows of numbers (empty cells, of terms that appeared later, left out); a row a kill cut
    short is skipped. No file: no rows."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if None in row or not (row.get("step") or "").isdigit():
                continue
            try:
                rows.append({k: float(v) for k, v in row.items() if v not in (None, "")})
            except ValueError:
                continue
    return rows


def checkpoint_step(ckpt: Path) -> int | None:
    """A checkpoint's step: its ``COMPLETE`` marker's, else its folder name's (None for neither)."""
    try:
        return int(json.loads((ckpt / "COMPLETE").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        match = _STEP.search(ckpt.name)
        return int(match.group(1)) if match else None


def read_validations(folder: Path) -> list[dict[str, Any]]:
    """Every ``validation/step_*/metrics.json`` (with its ``folder``), oldest step first; unreadable ones are
    skipped."""
    found = []
    for path in sorted(folder.glob("step_*/metrics.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            data["step"], data["rows"] = int(data["step"]), list(data["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        data["folder"] = path.parent
        found.append(data)
    return sorted(found, key=lambda d: d["step"])


def best_per_n(validations: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """For each N, the validation row with the best primary metric (max when higher is better, else min) over
    all validation steps, with its step."""
    best: dict[int, dict[str, Any]] = {}
    for v in validations:
        metric, higher = v.get("primary_metric"), bool(v.get("higher_is_better", True))
        for row in v["rows"]:
            value = row.get(metric)
            if "N" not in row or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            n, held = int(row["N"]), best.get(int(row["N"]))
            if held is None or (value > held[metric] if higher else value < held[metric]):
                best[n] = {"step": v["step"], **row, "N": n, "primary_metric": metric, "higher_is_better": higher}
    return dict(sorted(best.items()))


# ------------------------------------------------------------------------------------------------- sections
def _header(files: RunFiles, cfg: RunConfig, origin: Origin | None) -> str:
    what = files.run if files.run is not None else files.checkpoint
    kind = f"- kind: **{cfg.kind}** ({cfg.spec.label}), world: **{cfg.world.name}**, preset: {_preset_name(origin)}"
    lines = [f"# Run report: {files.spec}", "", kind]
    if files.run is None:
        lines.append(f"- a checkpoint on its own ({what}): no run folder around it, so no metrics or validation")
    return "\n".join(lines)


def _preset_name(origin: Origin | None) -> str:
    if origin is None:
        return "not recorded (no origin.yaml: trained before anystep recorded it, or a checkpoint on its own)"
    return f"`{origin.preset}`" if origin.preset else "none (the config defaults)"


def _config_section(cfg: RunConfig, origin: Origin | None, files: RunFiles) -> str:
    base, against = _reference_config(cfg, origin)
    diff = config_diff(base, cfg)
    head = f"## Config vs {against}\n\nthe run's config: `{files.config_file}`\n\n"
    if not diff:
        return head + "no difference."
    table = ["| key | " + ("preset" if origin and origin.preset else "default") + " | this run |", "|---|---|---|"]
    table += [f"| `{k}` | {_cell(a)} | {_cell(b)} |" for k, a, b in diff]
    return head + "\n".join(table)


_ABSENT = object()


def _reference_config(cfg: RunConfig, origin: Origin | None) -> tuple[RunConfig, str]:
    """The config the run is compared with: its recorded preset resolved without overrides, else its kind's
    defaults in its world (said which)."""
    defaults = f"the {cfg.kind!r} kind's defaults in the {cfg.world.name!r} world"
    if origin is not None and origin.preset:
        preset = origin.preset
        if Path(preset).suffix in (".yaml", ".yml") and not Path(preset).is_absolute():
            preset = str(Path(origin.cwd) / preset)
        try:
            return resolve(preset), f"its preset `{origin.preset}`"
        except ConfigError as err:
            return parse_run({"kind": cfg.kind, "world": {"name": cfg.world.name}}), \
                f"{defaults} (its preset `{origin.preset}` does not resolve here: {err})"
    why = "no preset recorded" if origin is None else "trained without a preset"
    return parse_run({"kind": cfg.kind, "world": {"name": cfg.world.name}}), f"{defaults} ({why})"


def config_diff(base: RunConfig, run: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, base value, run value)`` for every key whose value differs (a key only one side has: the
    other's value is ``_ABSENT``), in key order."""
    a, b = _flatten(to_dict(base)), _flatten(to_dict(run))
    for one, other in ((a, b), (b, a)):   # an unset section (None) beside a set one: its keys tell the story
        for key in [k for k, v in one.items() if v is None and any(o.startswith(k + ".") for o in other)]:
            del one[key]
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _cell(value: Any) -> str:
    if value is _ABSENT:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return text.replace("|", "\\|")


def _progress_section(files: RunFiles, cfg: RunConfig, rows: list[dict[str, float]], ckpt_step: int | None,
                      logged: int | None) -> str:
    planned = cfg.train.steps
    done = [f"{logged} logged (metrics.csv)" if logged is not None else "none logged",
            f"{ckpt_step} in the newest checkpoint" if ckpt_step is not None else "no checkpoint yet"]
    lines = ["## Progress", "", f"- steps: {', '.join(done)}; {planned} planned (train.steps)",
             f"- status: {_status(files, planned, max(ckpt_step or 0, logged or 0))}"]
    lines.append(f"- {_speed(files, cfg, rows)}")
    return "\n".join(lines)


def _status(files: RunFiles, planned: int, done: int) -> str:
    if files.run is not None and _locked(files.run):
        return "training now (another process holds the run folder's lock)"
    if done >= planned:
        return "finished"
    return f"stopped at step {done} of {planned} (killed, failed or interrupted: resume it below)"


def _locked(run: Path) -> bool:
    """Whether a training process holds ``run/.lock`` (:func:`~anystep.train.checkpoint.lock_run_folder`)."""
    try:
        fd = os.open(run / ".lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _speed(files: RunFiles, cfg: RunConfig, rows: list[dict[str, float]]) -> str:
    """Training time and steps/s: from metrics.csv's ``time/sec_per_step`` (each row's value times
    ``train.log_every`` is the time since the row before), else from the kept checkpoints' timestamps."""
    timed = [r for r in rows if "time/sec_per_step" in r]
    if timed:
        seconds = sum(r["time/sec_per_step"] for r in timed) * cfg.train.log_every
        steps = int(timed[-1]["step"])
        rate = f", {steps / seconds:.3g} steps/s" if seconds > 0 else ""
        return (f"training time: {_duration(seconds)} for {steps} steps{rate} (from metrics.csv: time/sec_per_step "
                f"x train.log_every summed over its {len(timed)} rows; building the model and start-up not counted)")
    ckpts = complete_checkpoints(files.run / CHECKPOINTS) if files.run is not None else []
    stamped = [(checkpoint_step(c), (c / "COMPLETE").stat().st_mtime) for c in ckpts if (c / "COMPLETE").is_file()]
    stamped = sorted((s, t) for s, t in stamped if s is not None)
    if len(stamped) >= 2 and stamped[-1][1] > stamped[0][1]:
        (s0, t0), (s1, t1) = stamped[0], stamped[-1]
        return (f"speed: {(s1 - s0) / (t1 - t0):.3g} steps/s between checkpoints step {s0} and {s1} (from their "
                f"COMPLETE files' timestamps, {_duration(t1 - t0)} apart; no time/sec_per_step in metrics.csv)")
    return "training time and speed: not measured (no time/sec_per_step in metrics.csv, fewer than two checkpoints)"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _losses_section(rows: list[dict[str, float]]) -> str:
    if not rows:
        return "## Last losses\n\nno metrics.csv rows yet."
    last = rows[-1]
    terms = {k: v for k, v in last.items() if k.startswith(("loss/", "grad_norm/", "lr/"))}
    table = ["| term | value |", "|---|---|"] + [f"| `{k}` | {v:.6g} |" for k, v in terms.items()]
    return f"## Last losses (step {int(last['step'])})\n\n" + "\n".join(table)


def _validation_section(validations: list[dict[str, Any]], best: dict[int, dict[str, Any]]) -> str:
    if not best:
        return "## Validation\n\nno validation yet" + (" (metrics.json without readable rows)" if validations else "")
    first = next(iter(best.values()))
    metric, higher = first["primary_metric"], first["higher_is_better"]
    others = sorted({k for b in best.values() for k in b} - {"N", "step", "primary_metric", "higher_is_better",
                                                               metric})
    head = (f"## Validation: best per N\n\n{len(validations)} validation step(s), the latest at step "
            f"{validations[-1]['step']}; primary metric `{metric}` ({'higher' if higher else 'lower'} is better), "
            "the best of each N over all steps, the others at that step:\n\n")
    table = ["| N | best " + metric + " | at step | " + " | ".join(others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    for n, b in best.items():
        cells = [_number(b.get(k)) for k in others]
        table.append(f"| {n} | {_number(b[metric])} | {b['step']} | " + " | ".join(cells) + " |")
    return head + "\n".join(table)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _files_section(files: RunFiles, cfg: RunConfig, validations: list[dict[str, Any]]) -> str:
    lines = ["## Where things are", ""]
    ckpts = complete_checkpoints(files.run / CHECKPOINTS) if files.run is not None else []
    if ckpts:
        names = ", ".join(c.name for c in reversed(ckpts))
        lines.append(f"- checkpoints: `{ckpts[-1]}` (newest; kept: {names})")
    elif files.checkpoint is not None:
        lines.append(f"- checkpoint: `{files.checkpoint}`")
    else:
        lines.append("- checkpoints: none yet")
    if files.run is not None:
        videos = [p for v in validations for p in sorted(v["folder"].glob("*.mp4"))]
        sweep = sorted((files.run / "sweep").glob("grid.*")) if (files.run / "sweep").is_dir() else []
        if videos:
            lines.append(f"- validation videos: `{videos[-1]}` (newest of {len(videos)})")
        if sweep:
            lines.append(f"- sweep: `{files.run / 'sweep'}` ({', '.join(p.name for p in sweep)}, sweep.md, sweep.png)")
        if not videos and not sweep:
            lines.append("- videos: none yet (`anystep sample` or `anystep sweep` make some)")
        lines.append(f"- metrics: `{files.run / 'metrics.csv'}`")
        lines.append(f"- tracker: {_tracker_line(files.run, cfg)}")
    return "\n".join(lines)


def _tracker_line(run: Path, cfg: RunConfig) -> str:
    """Where the run's tracker wrote (``train.tracker``) and how to look at it."""
    where = {"none": "none (train.tracker=none)",
             "tensorboard": f"TensorBoard, `tensorboard --logdir {run / 'tensorboard'}`",
             "wandb": f"wandb ({cfg.train.wandb_mode or 'offline'}) in `{run / 'wandb'}`"
                      + ("; upload with `wandb sync " + str(run / "wandb" / "offline-run-*") + "`"
                         if (cfg.train.wandb_mode or "offline") == "offline" else "")}
    return where[cfg.train.tracker]


def _commands_section(files: RunFiles, cfg: RunConfig, origin: Origin | None, done: int) -> str:
    here = Path.cwd().resolve()
    away = origin is not None and Path(origin.cwd).resolve() != here
    run = files.run.resolve() if files.run is not None and away else files.run
    ckpt = files.checkpoint.resolve() if files.checkpoint is not None and away else files.checkpoint
    cd = f"cd {shlex.quote(origin.cwd)} && " if away else ""
    launch = (f"torchrun --nproc-per-node {origin.processes} -m anystep"
              if origin is not None and origin.processes > 1 else "anystep")
    q = shlex.quote
    lines = ["## Commands", ""]
    if run is not None:
        more = (f" (finished: add train.steps=M with M > {cfg.train.steps} to train further)"
                if done >= cfg.train.steps else "")
        start = "--resume" if ckpt is not None else "--resume-if-present"
        lines.append(f"- resume: `{cd}{launch} {cfg.kind} --config {q(str(run / 'config.yaml'))} "
                     f"train.out_dir={q(str(run))} {start}`{more}")
    elif not files.shipped:
        lines.append(f"- continue in a new run folder: `{launch} {cfg.kind} --config {q(str(ckpt / 'config.yaml'))} "
                     f"train.out_dir=NEW_RUN_DIR --resume-from {q(str(ckpt))}`")
    if ckpt is not None or files.shipped:
        target = files.spec if files.shipped else str(run if run is not None else ckpt)
        lines.append(f"- sample: `{cd}anystep sample {q(target)} --steps 4`")
        refusal = not_exportable(cfg)
        if refusal:
            lines.append(f"- export: not for this run: it {refusal}")
        else:
            lines.append(f"- export: `{cd}anystep export {q(target)} --out {q(str(Path(target) / 'export'))}`")
    else:
        lines.append("- sample / export: after the first checkpoint")
    return "\n".join(lines)


__all__ = ["ORIGIN", "REPORT", "Report", "RunFiles", "best_per_n", "config_diff", "locate", "read_metrics",
           "read_validations", "report"]
