"""Videos to files: mp4 (imageio-ffmpeg's bundled ffmpeg), animated GIF and a PNG strip, with row labels."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(videos: torch.Tensor) -> np.ndarray:
    """(B, F, 3, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).cpu().numpy()


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def grid_frames(rows: dict[str, torch.Tensor], scale: int = 4, pad: int = 2, label_width: int = 110,
                columns: list[str] | None = None) -> np.ndarray:
    """One frame sequence (F, H', W', 3) showing each row's clips side by side, labelled on the left."""
    names = list(rows)
    vids = {k: _upscale(to_uint8(v), scale) for k, v in rows.items()}
    n, f, h, w, _ = next(iter(vids.values())).shape
    head = 12 if columns else 0
    height = head + len(names) * (h + pad) + pad
    width = label_width + n * (w + pad) + pad
    out = np.full((f, height, width, 3), 255, dtype=np.uint8)
    for i, name in enumerate(names):
        y = head + pad + i * (h + pad)
        for j in range(n):
            x = label_width + pad + j * (w + pad)
            out[:, y:y + h, x:x + w] = vids[name][j]
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((3, head + pad + i * (h + pad) + h // 2 - 5), name, fill=(0, 0, 0))
    for j, col in enumerate(columns or []):
        draw.text((label_width + pad + j * (w + pad), 1), col[-(w // 6):], fill=(0, 0, 0))
    labels = np.asarray(canvas)
    mask = (out[0] == 255).all(axis=-1)
    out[:, mask] = labels[mask]
    return out


def write_video(frames: np.ndarray, path: Path, fps: int = 4) -> list[Path]:
    """Write (F, H, W, 3) uint8 as mp4, GIF and a PNG strip (frames left to right). Returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    # mp4 encoders want sizes divisible by 16 (macro blocks); pad with white
    ph, pw = (-h) % 16, (-w) % 16
    padded = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=255)
    mp4, gif, png = path.with_suffix(".mp4"), path.with_suffix(".gif"), path.with_suffix(".png")
    imageio.mimwrite(mp4, list(padded), fps=fps, macro_block_size=1)
    imageio.mimwrite(gif, list(frames), duration=1000 / fps, loop=0)
    sep = np.full((h, 4, 3), 255, dtype=np.uint8)
    strip = np.concatenate([np.concatenate([fr, sep], axis=1) for fr in frames], axis=1)
    imageio.imwrite(png, strip)
    return [mp4, gif, png]


def save_video_grid(rows: dict[str, torch.Tensor], path: Path, columns: list[str] | None = None,
                    fps: int = 4) -> Path:
    """A grid video (one row per entry of ``rows``); returns the mp4 path (GIF and PNG strip beside it)."""
    return write_video(grid_frames(rows, columns=columns), path, fps)[0]
