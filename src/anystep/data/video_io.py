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

Decoding (``read_video``) takes ``frames`` frames from the start at a given stride, resizes the short side
(bilinear, antialiased) and centre-crops to ``(height, width)``, and scales to [-1, 1]: a float32
``(3, F, H, W)`` tensor, the ``(C, F, H, W)`` layout of Wan's VAE. The VAE compresses time 4x causally, so
``F`` must be ``4k + 1``.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CAPTION_TABLES = ("captions.json", "captions.tsv", "captions.txt")


class VideoSourceError(ValueError):
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
        raise ValueError(f"frames={frames}: Wan's VAE needs F = {temporal}k + 1 frames (1, 5, 9, ..., 81)")
    if height % spatial or width % spatial or height <= 0 or width <= 0:
        raise ValueError(f"height={height}, width={width}: both must be positive multiples of {spatial}")


def decode_frames(data: Path | str | bytes, count: int, stride: int = 1, name: str | None = None) -> np.ndarray:
    """Frames ``0, stride, ..., (count-1)*stride`` of an mp4 as uint8 ``(count, h, w, 3)``."""
    import imageio.v3 as iio

    name = name or str(data)[:200]
    needed = (count - 1) * stride + 1
    frames = []
    try:
        reader = iio.imiter(data, plugin="FFMPEG", extension=".mp4")
        try:
            frames = list(itertools.islice(reader, needed))
        finally:
            reader.close()
    except Exception as err:  # imageio/ffmpeg raise OSError, RuntimeError, ... for unreadable files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoDecodeError(f"cannot decode {name}: {first_line}") from err
    if len(frames) < needed:
        raise VideoDecodeError(f"{name} has {len(frames)} frames; {count} frames at stride {stride} need {needed}")
    return np.stack(frames[::stride])[..., :3]


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``(F, C, h, w)`` so it covers ``(height, width)`` (short side fits), then centre-crop."""
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return video[..., top:top + height, left:left + width]


def read_video(data: Path | str | bytes, frames: int, height: int, width: int, stride: int = 1,
               name: str | None = None) -> torch.Tensor:
    """An mp4 as the VAE's input: float32 ``(3, frames, height, width)`` in [-1, 1]."""
    check_video_shape(frames, height, width)
    pixels = torch.from_numpy(decode_frames(data, frames, stride, name)).permute(0, 3, 1, 2).float()
    pixels = resize_center_crop(pixels, height, width)
    return (pixels / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def load_item(item: VideoItem, frames: int, height: int, width: int, stride: int = 1) -> torch.Tensor:
    """``read_video`` of a source item (a file or a tar member)."""
    return read_video(item.data(), frames, height, width, stride, name=item.name)
