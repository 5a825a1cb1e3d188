"""Sample a trained run at any number of steps: picture the samples, and save them for judging elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..api import check_save_path, load
from ..errors import UsageError
from ..evaluate.pictures import save_picture
from ..evaluate.real_judge import decoded_videos


def sample_run(spec: str, steps: int = 4, *, prompts: Sequence[str] | None = None, num: int = 4, seed: int = 0,
               guidance: float | None = None, given_frames: int = 0, out: str | Path | None = "samples/sample",
               save: str | Path | None = None) -> list[Path]:
    """Sample ``spec``'s product at ``steps`` steps from ``num`` fixed noises (random prompts of its world, or
    ``prompts`` in the shapes world) through :meth:`anystep.api.Model.sample`; write its world's picture of them
    at ``out`` (a video grid: mp4, GIF, PNG strip; gmm: a scatter; None: no picture) and, with ``save``, the
    samples, their noises, conditions, labels and settings as a safetensors file (:meth:`~anystep.api.Samples.
    save`). ``guidance``: the CFG scale (default: a student's fused 1; the run's ``sweep.teacher_guidance`` for
    a teacher). ``given_frames``: a causal student generates the rest of the prompts' real clips from their
    first K frames (whole chunks; 1 = I2V). Returns the written paths (the picture's main file first)."""
    if steps < 1:
        raise UsageError(f"--steps must be >= 1, got {steps}")
    if out is None and save is None:
        raise UsageError("nothing to write: give a picture path or a samples file (--save)")
    if save is not None:
        check_save_path(save)   # before sampling, which may take long
    model = load(spec)
    samples = model.sample(steps, num, seed, prompts=prompts, guidance=guidance, given_frames=given_frames)
    written = []
    if out is not None:
        picture = model.judge or decoded_videos(model.world)   # the wan world: latents decoded by its VAE
        name = f"{model.role} N={steps}" + (f", first {given_frames} frame(s) given" if given_frames else "")
        written.append(save_picture(picture, {name: samples.x}, samples.eval_set, Path(out)))
    if save is not None:
        written.append(samples.save(save))
    return written
