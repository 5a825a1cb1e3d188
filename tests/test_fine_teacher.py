"""The fine shapes teacher (``shipped:shapes_teacher_fine``): the judge can tell it from every degraded reference of
its calibration, and the script that trains it is made of commands and keys that exist."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anystep.api import load

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_fine_teacher_scores_between_the_degraded_references_and_real_clips():
    """32 clips at 8 Euler steps (CFG 3): above every degraded reference of the judge's calibration (noise of std
    0.2, the per-prompt mean, static clips, pure noise), with shape and direction far above chance (1/3, 0), and
    better than the coarse shipped teacher on the same noises and prompts; real clips still score 1."""
    torch.manual_seed(0)
    fine, coarse = load("shipped:shapes_teacher_fine"), load("shipped:shapes_teacher")
    samples = fine.sample(8, n=32, seed=4321)
    scores = fine.score(samples)
    world, judge = fine.world, fine.judge
    ev = world.eval_set(32, 4321)
    real = judge.evaluate(world.world.render(ev.meta), ev.meta)
    g = torch.Generator().manual_seed(1)
    videos = world.world.render(ev.meta)
    degraded = {"noise 0.2": videos + 0.2 * torch.randn(videos.shape, generator=g),
                "per-prompt mean": world.world.mean_videos(ev.meta, 64, g),
                "static": videos[:, :1].expand_as(videos), "pure noise": torch.randn(videos.shape, generator=g)}
    assert real["total"] >= 0.99 > scores["total"]
    for name, v in degraded.items():
        assert scores["total"] > judge.evaluate(v, ev.meta)["total"] + 0.05, name
    assert scores["shape"] >= 0.55 and scores["direction"] >= 0.9 and scores["color"] >= 0.9
    assert scores["total"] > coarse.score(coarse.sample(8, n=32, seed=4321))["total"] + 0.1


@pytest.mark.slow
def test_the_fine_teacher_script_resolves_every_step(tmp_path):
    """scripts/train_shapes_teacher_fine.sh, each anystep call run with --dry-run (a stand-in ``anystep`` first on
    PATH): every preset, flag and override exists, in the order the script runs them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    (bin_dir / "anystep").write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
                                     f'exec {sys.executable} -m anystep "$@" --dry-run > /dev/null\n')
    (bin_dir / "anystep").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_shapes_teacher_fine.sh"), str(tmp_path / "runs")],
                          check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and all(c.startswith("teacher --config shapes_teacher_fine") for c in calls)
    assert "teacher.shift=1.0" in calls[2] and f"model.init={tmp_path / 'runs'}/shapes_teacher_fine_lr" in calls[2]
