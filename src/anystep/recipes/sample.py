"""Sample a trained run at any number of steps, and picture the samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..build import build_world, load_model
from ..causal import is_causal, sample_causal
from ..errors import UsageError
from ..evaluate.pictures import save_picture
from ..evaluate.real_judge import decoded_videos
from ..evaluate.sweep import Sampler, sample_batched
from ..worlds.base import EvalSet


def sample_run(spec: str, steps: int = 4, *, prompts: Sequence[str] | None = None, num: int = 4, seed: int = 0,
               guidance: float | None = None, given_frames: int = 0, out: str | Path = "samples/sample") -> Path:
    """Sample ``spec``'s product at ``steps`` steps from ``num`` fixed noises (random prompts of its world, or
    ``prompts`` in the shapes world), and write its world's picture of them (a video grid: mp4, GIF, PNG strip;
    gmm: a scatter). ``guidance``: the CFG scale (default: 1 for a student, whose guidance is fused; the run's
    ``sweep.teacher_guidance`` for a teacher). ``given_frames``: a causal student generates the rest of the
    prompts' real clips from their first K frames (whole chunks; 1 = I2V). Returns the picture's path."""
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    model, cfg, role = load_model(spec)
    world = build_world(cfg)
    judge = world.judge()
    if judge is None:   # the wan world: latents, pictured decoded by the model folder's VAE
        judge = decoded_videos(world)
    ev = _eval_set(world, num, seed, prompts)
    name = f"{role} N={steps}"
    if given_frames:
        if not is_causal(model) or world.name != "shapes":
            raise UsageError("--given-frames (I2V / V2V) is for causal students of the shapes world")
        given = world.world.render(ev.meta)[:, :given_frames]   # the prompts' real first frames
        x = sample_causal(model, ev.noise, ev.cond, steps, shift=cfg.sweep.shift, given=given)
        name += f", first {given_frames} frame(s) given"
    else:
        w = guidance if guidance is not None else (1.0 if role == "student" else cfg.sweep.teacher_guidance)
        x = sample_batched(Sampler(role, model, w, cfg.spec.sampler), world.null_cond, ev.noise, ev.cond, steps,
                           cfg.sweep.shift, seed=seed)
    return save_picture(judge, {name: x}, ev, Path(out))


def _eval_set(world, num: int, seed: int, prompts: Sequence[str] | None) -> EvalSet:
    ev = world.eval_set(num, seed)
    if not prompts:
        return ev
    if world.name != "shapes":
        raise UsageError("--prompt is for the shapes world")
    g = torch.Generator().manual_seed(seed)
    try:
        specs = [world.world.sample_specs(1, g, prompt=p)[0] for p in (list(prompts) * num)[:num]]
    except ValueError as err:
        raise UsageError(f"--prompt: {err}") from err
    return EvalSet(ev.noise, world.embed(specs), specs)
