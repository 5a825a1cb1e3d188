"""Experiment tracking: what a run records (scalars, videos, checkpoints, its config) mirrored to a tracker.

``train.tracker`` picks one entry of :data:`TRACKERS`:

* ``none`` - nothing beyond the run folder's own ``metrics.csv``;
* ``tensorboard`` (the default) - event files in ``RUN/tensorboard``: the scalars, the config and checkpoint
  paths as text, and each video as an animated GIF image (what ``SummaryWriter.add_video`` writes, made here with
  imageio because ``add_video`` needs moviepy);
* ``wandb`` - a Weights & Biases run in ``RUN/wandb`` (``pip install -e ".[wandb]"``): the resolved config as
  its config, the scalars against the training step (``step``, wandb's x-axis for every metric, so a resumed run
  may log a step again), videos as ``wandb.Video`` and the checkpoint paths in its summary. ``offline`` mode (the
  default) never touches the network; ``wandb sync RUN/wandb/offline-run-*`` uploads it later. A run that resumes
  from a checkpoint continues the same wandb run (its id is kept in ``RUN/wandb/run_id``); a run starting at
  step 0 starts a new one.

Only rank 0 opens a tracker (the loop's :class:`~anystep.train.loop.MetricsLog` holds it). Asking for a tracker
whose package is not installed is an error when the trainer is built (:func:`require`), never a silent no-op.
"""

from __future__ import annotations

import importlib.util
import io
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import UsageError

WANDB_MODES = ("offline", "online")


@dataclass(frozen=True)
class TrackerSettings:
    """How to open a run's tracker: which one (a key of :data:`TRACKERS`), the run folder, the resolved config
    (a nested dict) and the wandb project and mode."""

    name: str
    out_dir: Path
    config: dict[str, Any]
    wandb_project: str = "anystep"
    wandb_mode: str = "offline"


class Tracker(Protocol):
    """Where a run's records go besides its folder; opened at the step training starts from."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def video(self, step: int, tag: str, path: Path) -> None: ...

    def image(self, step: int, tag: str, path: Path) -> None: ...

    def checkpoint(self, step: int, path: Path) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class NoTracker:
    """``train.tracker=none``: records nothing (the run folder's ``metrics.csv`` is always written)."""

    package = None

    def __init__(self, settings: TrackerSettings | None = None, start_step: int = 0):
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def video(self, step: int, tag: str, path: Path) -> None:
        pass

    def image(self, step: int, tag: str, path: Path) -> None:
        pass

    def checkpoint(self, step: int, path: Path) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoardTracker:
    """TensorBoard event files in ``RUN/tensorboard`` (torch's ``SummaryWriter``)."""

    package = "tensorboard"

    def __init__(self, settings: TrackerSettings, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(settings.out_dir / "tensorboard"))
        self.writer.add_text("config", _yaml_block(settings.config), start_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def video(self, step: int, tag: str, path: Path) -> None:
        """The mp4 as an animated GIF in the Images tab (the summary ``add_video`` writes)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        frames, fps = read_frames(path)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                              encoded_image_string=gif_bytes(frames, fps))
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def image(self, step: int, tag: str, path: Path) -> None:
        """A picture file (a PNG: the gmm world's scatter) in the Images tab."""
        import imageio.v2 as imageio

        self.writer.add_image(tag, imageio.imread(path)[..., :3], step, dataformats="HWC")

    def checkpoint(self, step: int, path: Path) -> None:
        self.writer.add_text("checkpoint", str(path), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in ``RUN/wandb``, continued when the training run resumes."""

    package = "wandb"

    def __init__(self, settings: TrackerSettings, start_step: int = 0):
        import wandb

        id_file = settings.out_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None
        if run_id is None:
            run_id = secrets.token_hex(4)
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=settings.wandb_project, dir=str(settings.out_dir), mode=settings.wandb_mode,
                              id=run_id, resume="allow", name=settings.out_dir.name, config=settings.config,
                              settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.checkpoints: list[str] = list(self.run.summary.get("checkpoints", []) or [])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def video(self, step: int, tag: str, path: Path) -> None:
        self.run.log({"step": step, tag: self.wandb.Video(str(path), format=Path(path).suffix.lstrip("."))})

    def image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({"step": step, tag: self.wandb.Image(str(path))})

    def checkpoint(self, step: int, path: Path) -> None:
        """The newest checkpoint (absolute path) and every one saved so far, in the run's summary."""
        self.checkpoints.append(str(Path(path).resolve()))
        self.run.summary.update({"checkpoint": self.checkpoints[-1], "checkpoint_step": step,
                                 "checkpoints": self.checkpoints})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS: dict[str, type] = {"none": NoTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker}
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": 'pip install -e ".[wandb]" (or pip install wandb)'}


def require(name: str) -> None:
    """A UsageError when tracker ``name`` is unknown or its package is not installed."""
    if name not in TRACKERS:
        raise UsageError(f"train.tracker must be one of {list(TRACKERS)}, got {name!r}")
    package = TRACKERS[name].package
    if package is not None and importlib.util.find_spec(package) is None:
        raise UsageError(f"train.tracker={name} needs the {package!r} package, which is not installed: "
                         f"{INSTALL[name]}, or choose train.tracker=none")


def open_tracker(settings: TrackerSettings, start_step: int = 0) -> Tracker:
    """The tracker ``settings`` names, opened for a run that starts (or resumes) at ``start_step``."""
    require(settings.name)
    return TRACKERS[settings.name](settings, start_step)


# ------------------------------------------------------------------------------------------------- helpers
def read_frames(path: Path):
    """A video file's frames as uint8 ``(F, H, W, 3)`` and its frame rate (imageio: ffmpeg for mp4, pillow for
    GIF; 4 fps, the media module's, when the file does not say)."""
    import imageio.v3 as iio
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    frames = np.asarray(iio.imread(path, index=None))
    if frames.ndim == 3:   # one frame
        frames = frames[None]
    meta = iio.immeta(path)
    fps = meta.get("fps") or (1000 / meta["duration"] if meta.get("duration") else 4.0)
    return frames[..., :3], float(fps)


def gif_bytes(frames, fps: float) -> bytes:
    """Frames ``(F, H, W, 3)`` as an endlessly looping animated GIF."""
    import imageio.v3 as iio

    out = io.BytesIO()
    iio.imwrite(out, list(frames), extension=".gif", duration=1000 / fps, loop=0)
    return out.getvalue()


def _yaml_block(config: dict[str, Any]) -> str:
    """The config as a markdown code block (TensorBoard's text plugin renders markdown)."""
    import yaml

    return "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```"
