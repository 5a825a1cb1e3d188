"""Experiment tracking (``train.tracker``): what the tracker holds after a short gmm run is read back from its own
files (TensorBoard's event files, the offline wandb run's transaction log) and compared with the run folder's
``metrics.csv``, its resolved config and its checkpoints; videos with the frames that were written."""

from __future__ import annotations

import csv
import json
import struct
from typing import ClassVar

import imageio.v3 as iio
import numpy as np
import pytest
import yaml

from anystep.config import ConfigError, resolve, to_dict
from anystep.errors import UsageError
from anystep.evaluate.media import write_video
from anystep.recipes import build_trainer, train
from anystep.train import tracking
from anystep.train.distributed import Processes
from anystep.train.loop import NonFiniteLossError

TINY = ["world.name=gmm", "train.batch_size=16", "train.log_every=1", "ema.warmup_steps=2",
        "model.network.hidden=32", "model.network.depth=1", "optim.teacher.warmup_steps=2", "optim.teacher.lr=1e-3",
        "validation.every=0"]   # validation's records: test_validation_goes_to_the_tracker


def _cfg(out, *extra):
    return resolve(None, ["kind=teacher", f"train.out_dir={out}", *TINY, *extra])


def _metrics(run) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _video(path, colours) -> tuple:
    """An mp4 (and GIF, PNG) of solid-colour 32 x 48 frames, one per colour; returns the path and the frames."""
    frames = np.stack([np.broadcast_to(np.array(c, dtype=np.uint8), (32, 48, 3)) for c in colours])
    return write_video(frames, path, fps=5)[0], frames


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


# ------------------------------------------------------------------------------------------------ settings
def test_tracker_settings_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"train.tracker must be one of \['none', 'tensorboard', 'wandb'\]"):
        _cfg(tmp_path, "train.tracker=mlflow")
    with pytest.raises(ConfigError, match="train.wandb_project apply to train.tracker=wandb, not 'tensorboard'"):
        _cfg(tmp_path, "train.wandb_project=mine")
    with pytest.raises(ConfigError, match="train.wandb_mode must be one of"):
        _cfg(tmp_path, "train.tracker=wandb", "train.wandb_mode=cloud")
    # a tracker that is not installed is an error when the trainer is built, naming how to install it
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UsageError, match=r"train.tracker=wandb needs the 'wandb' package.*\.\[wandb\]"):
        build_trainer(_cfg(tmp_path, "train.tracker=wandb"), progress=False)
    assert not (tmp_path / "wandb").exists()


class Recorder:
    """A tracker that remembers what it was told."""

    package = None
    calls: ClassVar[list] = []

    def __init__(self, settings, start_step=0):
        Recorder.calls.append(("open", start_step, settings.config["train"]["steps"]))

    def scalars(self, step, values):
        Recorder.calls.append(("scalars", step, sorted(values)))

    def video(self, step, tag, path):
        Recorder.calls.append(("video", step, tag))

    def image(self, step, tag, path):
        Recorder.calls.append(("image", step, tag, path.name))

    def checkpoint(self, step, path):
        Recorder.calls.append(("checkpoint", step, path.name))

    def close(self, failed=False):
        Recorder.calls.append(("close", failed))


def test_the_loop_tells_the_tracker_each_log_checkpoint_and_how_it_ended(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.TRACKERS, "none", Recorder)
    Recorder.calls = []
    cfg = _cfg(tmp_path, "train.tracker=none", "train.steps=4", "train.log_every=2", "train.checkpoint_every=3")
    trainer = build_trainer(cfg, progress=False)
    trainer.fit()
    keys = sorted(set(_metrics(tmp_path)[0]) - {"step"})     # metrics.csv's columns but the step
    assert Recorder.calls == [("open", 0, 4), ("scalars", 2, keys), ("checkpoint", 3, "step_000003"),
                              ("scalars", 4, keys), ("checkpoint", 4, "step_000004"), ("close", False)]
    # a run that fails closes its tracker as failed, after what it logged
    Recorder.calls = []
    import torch
    with torch.no_grad():
        for p in trainer.method.roles["teacher"].parameters():
            p.fill_(float("nan"))
    trainer.steps = 6
    with pytest.raises(NonFiniteLossError):
        trainer.fit()
    assert Recorder.calls == [("open", 4, 4), ("close", True)]
    # only rank 0 tracks (here a process told it is rank 1, without the collectives of a real group)
    Recorder.calls = []
    quiet = build_trainer(_cfg(tmp_path / "rank1", "train.tracker=none", "train.steps=2"), progress=False)
    quiet.processes = Processes(rank=1, world_size=1)
    quiet.fit()
    assert Recorder.calls == [] and not (tmp_path / "rank1" / "metrics.csv").exists()


@pytest.mark.parametrize("world, picture", [
    (["world.name=gmm", "model.network.hidden=32", "model.network.depth=1", "validation.num_samples=64"],
     ("image", "grid.png")),
    (["world.name=shapes", "validation.num_samples=2"], ("video", None))])
def test_validation_goes_to_the_tracker(world, picture, tmp_path, monkeypatch):
    """A validation's scalars join its step's, its picture follows: the gmm scatter as an image, a video
    world's grid as a video."""
    monkeypatch.setitem(tracking.TRACKERS, "none", Recorder)
    Recorder.calls = []
    overrides = [a for a in TINY if not a.startswith(("validation.", "world.", "model.network."))]
    train(resolve(None, ["kind=teacher", f"train.out_dir={tmp_path}", *overrides, *world, "train.tracker=none",
                         "train.steps=2", "validation.every=2", "validation.steps=[1,2]"]), progress=False)
    logged = [c for c in Recorder.calls if c[0] == "scalars"]
    assert [c[1] for c in logged] == [1, 2, 2] and all(k.startswith(("val/N", "time/")) for k in logged[2][2])
    shown = [c for c in Recorder.calls if c[0] in ("image", "video")]
    assert len(shown) == 1 and shown[0][:3] == (picture[0], 2, "validation")
    assert picture[1] is None or shown[0][3] == picture[1]


def test_tracker_none_writes_only_the_run_folder(tmp_path):
    train(_cfg(tmp_path, "train.tracker=none", "train.steps=1"), progress=False)
    assert (tmp_path / "metrics.csv").is_file()
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


# ------------------------------------------------------------------------------------------------ tensorboard
def test_tensorboard_holds_the_scalars_config_checkpoints_and_videos(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "train.steps=3", "train.checkpoint_every=2")   # train.tracker's default
    last = train(cfg, progress=False)
    video, frames = _video(tmp_path / "validation" / "step_000003" / "grid", COLOURS)
    tracker = tracking.open_tracker(tracking.TrackerSettings("tensorboard", tmp_path, to_dict(cfg)), 3)
    tracker.video(3, "val/grid", video)
    tracker.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    rows = _metrics(tmp_path)
    assert set(events.Tags()["scalars"]) == set(rows[0]) - {"step"}
    for key in rows[0]:
        if key != "step":
            logged = events.Scalars(key)
            assert [e.step for e in logged] == [r["step"] for r in rows]
            assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)   # float32 in TB
    text = {tag: [e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)]
            for tag in ("config/text_summary", "checkpoint/text_summary")}
    assert yaml.safe_load(text["config/text_summary"][0].strip("`").removeprefix("yaml\n")) == to_dict(cfg)
    assert text["checkpoint/text_summary"] == [str(last.parent / "step_000002"), str(last)]
    # the video: an animated GIF of the mp4's frames (colours within the two encoders' loss)
    (image,) = events.Images("val/grid")
    gif = iio.imread(image.encoded_image_string, index=None, extension=".gif")[..., :3]
    assert image.step == 3 and (image.height, image.width) == (32, 48) and gif.shape == frames.shape
    assert np.abs(gif.astype(int) - frames).mean() < 8


# ------------------------------------------------------------------------------------------------ wandb
def _records(run) -> list:
    """Every record of the run folder's offline wandb runs, read from their transaction logs (``.wandb``: a 7-byte
    header, then LevelDB-log records of protobuf ``Record`` messages in 32 KiB blocks)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()   # run.finish() returns before wandb's service has flushed the log; this waits for it
    out = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, chunk = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (length == 0 and kind == 0):   # a block's zero-padded end
                pos += left
                continue
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):   # a whole record, or a record's last piece
                record = pb.Record()
                record.ParseFromString(chunk)
                out.append(record)
                chunk = b""
    return out


def _of(records, kind) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _items(items, out=None) -> dict:
    """History or summary items (a key, or a path of nested keys, and a JSON value) as a nested dict."""
    out = {} if out is None else out
    for item in items:
        *path, last = list(item.nested_key) or [item.key]
        node = out
        for key in path:
            node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)
    return out


def _history(records) -> list[dict]:
    return [_items(h.item) for h in _of(records, "history")]


def _summary(records) -> dict:
    out: dict = {}
    for s in _of(records, "summary"):
        _items(s.update, out)
    return out


@pytest.fixture
def offline(monkeypatch):
    """wandb without network, prompts or its system-metrics sampler."""
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB__DISABLE_STATS": "true",
                       "WANDB_DISABLE_GIT": "true", "WANDB_API_KEY": ""}.items():
        monkeypatch.setenv(key, value)


def test_wandb_offline_run_holds_config_metrics_checkpoints_and_videos(tmp_path, offline):
    cfg = _cfg(tmp_path, "train.tracker=wandb", "train.wandb_project=tests", "train.steps=2")
    first = train(cfg, progress=False)
    records = _records(tmp_path)
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    (run,) = _of(records, "run")
    assert run.run_id == run_id and run.project == "tests"
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config == to_dict(cfg)
    history = _history(records)
    rows = _metrics(tmp_path)
    assert [h["step"] for h in history] == [1, 2]
    for h, r in zip(history, rows):
        assert {k: h[k] for k in r} == pytest.approx(r, rel=1e-12)   # JSON keeps the float64
    summary = _summary(records)
    assert summary["checkpoint"] == str(first.resolve()) and summary["checkpoints"] == [str(first.resolve())]
    assert _of(records, "exit")[0].exit_code == 0

    # resuming the training run continues the same wandb run; a video goes into the run's files
    train(_cfg(tmp_path, "train.tracker=wandb", "train.wandb_project=tests", "train.steps=3"), resume=True,
          progress=False)
    assert (tmp_path / "wandb" / "run_id").read_text().strip() == run_id
    video, frames = _video(tmp_path / "validation" / "step_000003" / "grid", COLOURS)
    settings = tracking.TrackerSettings("wandb", tmp_path, to_dict(cfg), "tests")
    tracker = tracking.open_tracker(settings, start_step=3)
    tracker.video(3, "val/grid", video)
    tracker.close()
    records = _records(tmp_path)
    assert {r.run_id for r in _of(records, "run")} == {run_id}
    history = _history(records)
    assert 3 in [h["step"] for h in history if "loss/flow_matching" in h]
    (logged,) = [h for h in history if "val/grid" in h]
    assert logged["step"] == 3 and logged["val/grid"]["_type"] == "video-file"
    (stored,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}*/files/{logged['val/grid']['path']}")
    assert stored.read_bytes() == video.read_bytes()
    assert len(iio.imread(stored, index=None)) == len(frames)
