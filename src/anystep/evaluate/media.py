"""Videos to files: mp4 (imageio-ffmpeg's bundled ffmpeg), animated GIF and a PNG strip, with row labels."""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(videos: torch.Tensor) -> np.ndarray:
    """(B, F, 3, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).cpu().numpy()


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The grids' font: Pillow's bundled default (FreeType, 10 px, when Pillow has FreeType)."""
    return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    """The rendered width of ``text`` in pixels (its ink box from the origin: ``ImageDraw.textbbox``)."""
    return math.ceil(draw.textbbox((0, 0), text, font=font)[2]) if text else 0


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken between words (a word wider than a line is
    broken between characters): every character is kept, in order."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and text_width(draw, joined, font) <= width:
            lines[-1] = joined
            continue
        while len(word) > 1 and text_width(draw, word, font) > width:
            cut = 1
            while cut + 1 < len(word) and text_width(draw, word[:cut + 1], font) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def grid_frames(rows: dict[str, torch.Tensor], scale: int = 4, pad: int = 2, label_width: int | None = None,
                columns: list[str] | None = None) -> np.ndarray:
    """One frame sequence (F, H', W', 3) showing each row's clips side by side, labelled on the left and titled
    above. Labels are never cut: the label column is as wide as the widest row label (``label_width``: at
    least that), and column titles wrap onto as many lines as they need within their column."""
    names = list(rows)
    vids = {k: _upscale(to_uint8(v), scale) for k, v in rows.items()}
    n, f, h, w, _ = next(iter(vids.values())).shape
    font, draw = label_font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _line_height(draw, font)
    widest = max(text_width(draw, name, font) for name in names) + 2 * LABEL_MARGIN
    label_width = max(label_width or 0, widest)
    titles = [wrap_text(draw, col, font, max(w - TITLE_GAP, 1)) for col in columns or []]
    head = max((len(t) for t in titles), default=0) * line + (pad if titles else 0)
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
        draw.text((LABEL_MARGIN, head + pad + i * (h + pad) + (h - line) // 2), name, fill=(0, 0, 0), font=font)
    for j, lines in enumerate(titles):
        for k, text in enumerate(lines):
            draw.text((label_width + pad + j * (w + pad), k * line), text, fill=(0, 0, 0), font=font)
    labels = np.asarray(canvas)
    mask = (out[0] == 255).all(axis=-1)
    out[:, mask] = labels[mask]
    return out


LABEL_MARGIN = 3   # pixels left and right of a row label
TITLE_GAP = 4      # pixels kept free between neighbouring column titles


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    """A text line's height: the ink box of tall and descending letters, plus a pixel."""
    return math.ceil(draw.textbbox((0, 0), "Ag|", font=font)[3]) + 1


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
