"""Sources of (video, caption) pairs, and decoding an mp4 into the VAE's input tensor.

Two kinds of source, both listed in a deterministic order with a stable string id per item (the cache uses
the ids to resume):

* a **folder of .mp4 files** (searched recursively; id = the path relative to the folder). Captions come from
  ``captions.json`` (``{"file.mp4": "caption"}`` or ``[{"video": "file.mp4", "caption": "..."}]``), or
  ``captions.tsv`` / ``captions.txt`` (``file.mp4<TAB>caption`` per line), or else a same-named ``.txt``
  beside each video. Keys may be the relative path or the bare file name.
* **webdataset-style tar shards** (a folder of ``.tar`` files, or one ``.tar``): members ``key.mp4`` with
  ``key.txt`` or ``key.json`` (``{"caption": ...}``); id = ``"<tar name>/<key>"``.

A source with no videos or a video with no caption is an error naming the file. Unreadable or too-short
videos are only found when decoded: ``read_video`` raises ``VideoDecodeError`` and the caller skips them.

Decoding (``read_video``) picks ``frames`` frames from the start, resizes them to ``(height, width)``
(bilinear, antialiased) and scales to [-1, 1]: a float32 ``(3, F, H, W)`` tensor, the ``(C, F, H, W)`` layout
of Wan's VAE. The VAE compresses time 4x causally, so ``F`` must be ``4k + 1``. How frames are picked and
resized is a :class:`VideoPrep`; the default is the official preparation (``far/data/t2v_tar_dataset.py``):

* **fps 16**: time-based resampling to 16 fps from the source fps in the container metadata, with the
  official accumulator rule (:func:`resample_indices`), so 81 frames are ~5 s of motion whatever the source
  rate (a source at or below 16 fps gives every frame, as in the official code);
* **resize "stretch"**: straight to ``(height, width)``, no crop (the aspect ratio is not kept).

The alternatives: ``stride=N`` (every N-th source frame, ignoring the fps) and ``resize="crop"`` (resize the
short side, centre-crop).
"""

from __future__ import annotations

import itertools
import json
import math
import posixpath
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError

CAPTION_TABLES = ("captions.json", "captions.tsv", "captions.txt")
OFFICIAL_FPS = 16.0
RESIZE_MODES = ("stretch", "crop")


class VideoSourceError(UsageError):
    """A source that cannot be listed: no videos, a missing caption, a malformed caption file."""


class VideoDecodeError(RuntimeError):
    """A video that cannot be used: unreadable, or shorter than the frames asked for."""


@dataclass(frozen=True)
class VideoItem:
    """One (video, caption) pair. ``member`` is set for a video inside a tar: then ``path`` is the tar and
    ``offset``/``size`` locate the member's bytes in it."""

    id: str
    caption: str
    path: Path
    member: str | None = None
    offset: int = 0
    size: int = 0

    @property
    def name(self) -> str:
        """A human-readable location for messages."""
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def data(self) -> Path | bytes:
        """The video file, or its bytes for a tar member (read directly at its offset)."""
        if self.member is None:
            return self.path
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


# ----------------------------------------------------------------------------------------- sources
def list_items(source: str | Path) -> list[VideoItem]:
    """All (video, caption) items of a folder of mp4 files, a folder of tar shards, or one tar."""
    src = Path(source).expanduser()
    if not src.exists():
        raise VideoSourceError(f"video source not found: {src}")
    if src.is_file():
        if src.suffix != ".tar":
            raise VideoSourceError(f"video source {src} is a file but not a .tar shard")
        items = tar_items(src)
    else:
        videos = sorted(p for p in src.rglob("*.mp4") if p.is_file())
        tars = sorted(p for p in src.glob("*.tar") if p.is_file())
        if videos and tars:
            raise VideoSourceError(f"{src} holds both .mp4 files and .tar shards; use one kind per source")
        items = [it for t in tars for it in tar_items(t)] if tars else folder_items(src, videos)
    if not items:
        raise VideoSourceError(f"no videos found in {src} (expected .mp4 files or .tar shards of key.mp4 + "
                               f"key.txt/key.json)")
    return items


def folder_items(folder: Path, videos: list[Path]) -> list[VideoItem]:
    """Items for the mp4 files of a folder, captioned from a caption table or sidecar .txt files."""
    table = read_caption_table(folder)
    items = []
    for video in videos:
        rel = video.relative_to(folder).as_posix()
        caption = table.get(rel, table.get(video.name))
        sidecar = video.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8")
        items.append(VideoItem(rel, require_caption(caption, video), video))
    return items


def read_caption_table(folder: Path) -> dict[str, str]:
    """The first caption table found in ``folder`` (``captions.json``, ``.tsv``, ``.txt``) as a dict."""
    for name in CAPTION_TABLES:
        path = folder / name
        if path.is_file():
            return parse_json_captions(path) if name.endswith(".json") else parse_tsv_captions(path)
    return {}


def parse_json_captions(path: Path) -> dict[str, str]:
    """``{"file.mp4": "caption"}`` or ``[{"video": "file.mp4", "caption": "..."}, ...]``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise VideoSourceError(f"{path} is not valid JSON: {err}") from err
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    if isinstance(data, list) and all(isinstance(e, dict) and "video" in e and "caption" in e for e in data):
        return {str(e["video"]): str(e["caption"]) for e in data}
    raise VideoSourceError(f"{path}: expected {{\"file.mp4\": \"caption\"}} or a list of "
                           f"{{\"video\": ..., \"caption\": ...}}")


def parse_tsv_captions(path: Path) -> dict[str, str]:
    """One ``file.mp4<TAB>caption`` per line (blank lines ignored)."""
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        video, tab, caption = line.partition("\t")
        if not tab:
            raise VideoSourceError(f"{path}, line {number}: expected 'file.mp4<TAB>caption', got {line!r}")
        table[video.strip()] = caption
    return table


def require_caption(caption: str | None, where: Path | str) -> str:
    """The caption, or an error naming the video that has none."""
    if caption is None or not caption.strip():
        raise VideoSourceError(f"no caption for {where} (give captions.json, captions.tsv/.txt, or a "
                               f"same-named .txt beside the video; in a tar, key.txt or key.json)")
    return caption.strip()


def tar_items(tar_path: Path) -> list[VideoItem]:
    """Items of one webdataset-style tar: ``key.mp4`` with ``key.txt`` or ``key.json`` (``"caption"``)."""
    videos, captions = {}, {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if ext == "mp4":
                    videos[key] = member
                elif ext in ("txt", "json") and key not in captions:
                    captions[key] = member_caption(tar, member, tar_path)
    except tarfile.TarError as err:
        raise VideoSourceError(f"cannot read tar shard {tar_path}: {err}") from err
    return [VideoItem(f"{tar_path.name}/{key}", require_caption(captions.get(key), f"{tar_path}:{m.name}"),
                      tar_path, m.name, m.offset_data, m.size) for key, m in videos.items()]


def split_key(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: ``dir/000123.mp4`` -> ``("dir/000123", "mp4")``."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def member_caption(tar: tarfile.TarFile, member: tarfile.TarInfo, tar_path: Path) -> str | None:
    """The caption text of a ``.txt`` member, or the ``"caption"`` field of a ``.json`` member."""
    text = tar.extractfile(member).read().decode("utf-8")
    if not member.name.endswith(".json"):
        return text
    try:
        caption = json.loads(text).get("caption")
    except (json.JSONDecodeError, AttributeError) as err:
        raise VideoSourceError(f"{tar_path}:{member.name}: expected a JSON object with \"caption\"") from err
    return None if caption is None else str(caption)


# ----------------------------------------------------------------------------------------- decoding
def check_video_shape(frames: int, height: int, width: int, temporal: int = 4, spatial: int = 16) -> None:
    """Wan needs ``frames = 4k + 1`` (causal 4x temporal VAE) and sides divisible by 16 (VAE 8x, patch 2)."""
    if frames < 1 or (frames - 1) % temporal:
        raise UsageError(f"frames={frames}: Wan's VAE needs F = {temporal}k + 1 frames (1, 5, 9, ..., 81)")
    if height % spatial or width % spatial or height <= 0 or width <= 0:
        raise UsageError(f"height={height}, width={width}: both must be positive multiples of {spatial}")


@dataclass(frozen=True)
class VideoPrep:
    """How a video's frames are picked and resized (defaults: the official preparation).

    Args:
        fps: resample in time to this frame rate (official 16); None or 0 picks frames by ``stride`` instead.
        stride: take every ``stride``-th source frame; only without ``fps`` (None then means 1).
        resize: ``"stretch"`` to the target size without crop (official) or ``"crop"`` (cover, centre-crop).

    Giving both an ``fps`` and a ``stride`` is an error: they are two different frame rules.
    """

    fps: float | None = OFFICIAL_FPS
    stride: int | None = None
    resize: str = "stretch"

    def __post_init__(self):
        fps = None if not self.fps else float(self.fps)
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise UsageError(f"fps must be a positive frame rate (or 0/None for a stride), got {self.fps!r}")
        if fps is not None and self.stride is not None:
            raise UsageError(f"give a target fps ({fps:g}, time-based) or a frame stride ({self.stride}), not "
                             f"both; pass fps=0 (CLI: --fps 0) to pick frames by stride")
        stride = None if fps is not None else (1 if self.stride is None else self.stride)
        if stride is not None and (not isinstance(stride, int) or stride < 1):
            raise UsageError(f"stride must be an integer >= 1, got {self.stride!r}")
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        object.__setattr__(self, "fps", fps)
        object.__setattr__(self, "stride", stride)

    def settings(self) -> dict:
        """The fields a cache header records (a resumed cache must match them)."""
        return asdict(self)

    def indices(self, count: int, source_fps: float | None, name: str) -> list[int]:
        """The source frame indices of ``count`` output frames (``source_fps`` is needed for an fps rule)."""
        if self.fps is None:
            return list(range(0, count * self.stride, self.stride))
        if source_fps is None or not math.isfinite(source_fps) or source_fps <= 0:
            raise VideoDecodeError(f"{name}: the container has no frame rate, needed to resample to "
                                   f"{self.fps:g} fps; use a frame stride instead (CLI: --stride N)")
        return resample_indices(count, source_fps, self.fps)

    def describe(self, source_fps: float | None) -> str:
        """The frame rule in words, for messages."""
        if self.fps is None:
            return f"at stride {self.stride}"
        return f"at {self.fps:g} fps (source {source_fps:g} fps)"


def resample_indices(count: int, source_fps: float, target_fps: float) -> list[int]:
    """The first ``count`` source frames the official time-based resampler keeps (``select_frame_indices`` in
    the official ``far/utils/video_util.py``): frame 0, then frame i whenever an accumulator that grows by
    ``target_fps / source_fps`` per source frame reaches 1 (and then loses 1). The k-th output frame is thus
    the first source frame at or after time k / target_fps, up to float rounding of the running sum (kept:
    the official code accumulates in floats too, e.g. at 30 fps it takes frame 16 where exact arithmetic
    gives 15). A source at or below ``target_fps`` keeps every frame (no frame is repeated)."""
    step, acc, picks, i = target_fps / source_fps, 0.0, [0], 0
    while len(picks) < count:
        i += 1
        acc += step
        if acc >= 1.0:
            picks.append(i)
            acc -= 1.0
    return picks[:count]


def decode_frames(data: Path | str | bytes, count: int, prep: VideoPrep = VideoPrep(),
                  name: str | None = None) -> np.ndarray:
    """The ``count`` frames ``prep`` picks from an mp4, as uint8 ``(count, h, w, 3)``."""
    import imageio.v3 as iio

    name = name or str(data)[:200]
    try:
        with iio.imopen(data, "r", plugin="FFMPEG", extension=".mp4") as file:
            reader = file.legacy_get_reader()
            try:
                source_fps = reader.get_meta_data().get("fps")
                indices = prep.indices(count, source_fps, name)
                wanted, frames, seen = set(indices), [], 0
                for seen, frame in enumerate(itertools.islice(reader, indices[-1] + 1), start=1):
                    if seen - 1 in wanted:     # keep only the picked frames (a 60 fps source decodes 4x more)
                        frames.append(frame)
            finally:
                reader.close()
    except VideoDecodeError:
        raise
    except Exception as err:  # imageio/ffmpeg raise OSError, RuntimeError, ... for unreadable files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoDecodeError(f"cannot decode {name}: {first_line}") from err
    if seen <= indices[-1]:
        raise VideoDecodeError(f"{name} has {seen} frames; {count} frames {prep.describe(source_fps)} "
                               f"need {indices[-1] + 1}")
    return np.stack(frames)[..., :3]


def resize_stretch(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``(F, C, h, w)`` to exactly ``(height, width)``: the whole frame, aspect ratio not kept."""
    if tuple(video.shape[-2:]) == (height, width):
        return video
    return F.interpolate(video, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``(F, C, h, w)`` so it covers ``(height, width)`` (short side fits), then centre-crop."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return video[..., top:top + height, left:left + width]


def read_video(data: Path | str | bytes, frames: int, height: int, width: int, prep: VideoPrep = VideoPrep(),
               name: str | None = None) -> torch.Tensor:
    """An mp4 as the VAE's input: float32 ``(3, frames, height, width)`` in [-1, 1], frames picked and
    resized as ``prep`` says (default: the official 16 fps, stretched to the size)."""
    check_video_shape(frames, height, width)
    pixels = torch.from_numpy(decode_frames(data, frames, prep, name)).permute(0, 3, 1, 2).float()
    resize = resize_stretch if prep.resize == "stretch" else resize_center_crop
    pixels = resize(pixels, height, width)
    return (pixels / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def load_item(item: VideoItem, frames: int, height: int, width: int, prep: VideoPrep = VideoPrep()) -> torch.Tensor:
    """``read_video`` of a source item (a file or a tar member)."""
    return read_video(item.data(), frames, height, width, prep, name=item.name)
