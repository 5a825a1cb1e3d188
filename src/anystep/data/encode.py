"""Cache real (video, caption) pairs as normalised Wan VAE latents and UMT5 prompt embeddings.

    cache_videos("models/Wan2.1-T2V-1.3B-Diffusers", "data/clips", "cache/clips")

Each video becomes the VAE's posterior mean, normalised per channel as ``(z - latents_mean) / latents_std``
(the space in which WanPipeline denoises), each caption its trimmed UMT5 embedding (``text.encode_prompts``);
both go to shards in the format of ``shards.py``. The VAE runs in float32 (as diffusers' Wan examples
recommend), the text encoder in the cache's ``dtype`` (Wan runs UMT5 in bfloat16). The transformer is not
loaded. A second call with the same settings resumes: ids already in the cache are skipped.

Frames are prepared as the official code does by default (``video_io.VideoPrep``): resampled to 16 fps from
the source's frame rate and stretched to the target size without crop; ``stride=N`` (with ``fps=None``) and
``resize="crop"`` give the older fixed-stride, centre-crop preparation. The choice is in the header.

Under ``torchrun`` each process caches its share of the items into its own part of the cache, and rank 0 joins
the parts into one index at the end (:mod:`anystep.data.cache_parts`).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.folder import require_local_folder
from .cache_parts import done_everywhere, join_parts, share_of_work, writer_dir
from .latent_cache import ShardWriter, read_index, torch_dtype, write_null_embedding
from .text import WAN_NEGATIVE_PROMPT, encode_prompts
from .video_io import (
    OFFICIAL_FPS,
    VideoDecodeError,
    VideoItem,
    VideoPrep,
    check_video_shape,
    list_items,
    load_item,
)


def latent_stats(vae_config) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel ``latents_mean`` and ``latents_std``, shaped ``(1, C, 1, 1, 1)``."""
    mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return mean, std


def normalize_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """Raw VAE latents -> the denoiser's space: ``(z - mean) / std`` per channel."""
    mean, std = latent_stats(vae_config)
    return (z.float() - mean.to(z.device)) / std.to(z.device)


def latent_shape(vae_config, frames: int, height: int, width: int) -> list[int]:
    """``[C, F, H, W]`` of the latents of a ``frames x height x width`` video."""
    t, s = vae_config.scale_factor_temporal, vae_config.scale_factor_spatial
    return [vae_config.z_dim, (frames - 1) // t + 1, height // s, width // s]


@torch.no_grad()
def encode_videos(vae, videos: torch.Tensor) -> torch.Tensor:
    """``(B, 3, F, H, W)`` pixels in [-1, 1] -> normalised posterior-mean latents ``(B, C, F', H', W')`` (CPU)."""
    device = next(vae.parameters()).device
    mean = vae.encode(videos.to(device, vae.dtype)).latent_dist.mean
    return normalize_latents(mean, vae.config).cpu()


def load_encoders(folder: Path, dtype: str, device: str | torch.device) -> tuple:
    """``(vae, tokenizer, text_encoder)`` of a local Wan folder: VAE in float32, text encoder in ``dtype``."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    for part in ("vae", "tokenizer", "text_encoder"):
        require_local_folder(folder, part)
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder",
                                                    torch_dtype=torch_dtype(dtype))
    return vae.to(device).eval(), tokenizer, text_encoder.to(device).eval()


def cache_header(folder: Path, vae, text_encoder, *, frames: int, height: int, width: int, prep: VideoPrep,
                 max_text_len: int, dtype: str, negative_prompt: str, videos: str | Path) -> dict:
    """The index header of a video cache (the fields a resumed run must match, plus information)."""
    return {"model": str(folder.resolve()), "source": "videos", "frames": frames, "height": height,
            "width": width, "latent_shape": latent_shape(vae.config, frames, height, width),
            "text_dim": int(text_encoder.config.d_model), "max_text_len": max_text_len, "dtype": dtype,
            "settings": {**prep.settings(), "negative_prompt": negative_prompt, "vae_dtype": "float32"},
            "videos": str(Path(videos).resolve())}


def decode_batch(items: list[VideoItem], writer: ShardWriter, frames: int, height: int, width: int,
                 prep: VideoPrep) -> tuple[list[VideoItem], list[torch.Tensor]]:
    """Decode a batch of items; unreadable or too-short videos are skipped with a warning and recorded."""
    kept, videos = [], []
    for item in items:
        try:
            videos.append(load_item(item, frames, height, width, prep))
            kept.append(item)
        except VideoDecodeError as err:
            warnings.warn(f"skipping {item.id}: {err}", stacklevel=3)
            writer.skip(item.id, str(err))
    return kept, videos


def cache_videos(model: str | Path, source: str | Path, out_dir: str | Path, *, frames: int = 81,
                 height: int = 480, width: int = 832, fps: float | None = OFFICIAL_FPS,
                 stride: int | None = None, resize: str = "stretch", max_text_len: int = 512,
                 shard_size: int = 64, batch_size: int = 1, dtype: str = "bfloat16",
                 device: str | torch.device = "cpu", negative_prompt: str = WAN_NEGATIVE_PROMPT,
                 progress: bool = True, limit: int | None = None, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] | None = None) -> Path:
    """Cache the (video, caption) pairs of ``source`` (see ``video_io``) as latents + embeddings in ``out_dir``.

    Frames: ``fps`` (official 16) resamples each video in time from its container's frame rate; with
    ``fps=None`` (or 0) every ``stride``-th frame is taken instead (giving both is an error). ``resize`` is
    ``"stretch"`` (official: the whole frame, aspect not kept) or ``"crop"`` (centre-crop). Videos too short
    for ``frames`` frames, or without a frame rate when one is needed, are skipped with a warning.
    ``limit`` caches only the first ``limit`` items of the source (in its fixed order); calling again
    with a larger or no limit continues. ``rank`` of ``world_size`` processes caches its chunks of the items;
    ``barrier`` waits for all of them (rank 0 then writes the joined index). Returns ``out_dir``."""
    from tqdm.auto import tqdm

    check_video_shape(frames, height, width)
    prep = VideoPrep(fps, stride, resize)
    folder = require_local_folder(model, "vae")
    items = list_items(source)[:limit]
    vae, tokenizer, text_encoder = load_encoders(folder, dtype, device)
    header = cache_header(folder, vae, text_encoder, frames=frames, height=height, width=width, prep=prep,
                          max_text_len=max_text_len, dtype=dtype, negative_prompt=negative_prompt,
                          videos=source)
    many = world_size > 1
    with torch.no_grad(), ShardWriter(writer_dir(out_dir, rank, world_size), shard_size, header) as writer:
        null = encode_prompts(tokenizer, text_encoder, [negative_prompt], max_text_len)[0]
        if rank == 0:
            write_null_embedding(out_dir, null, negative_prompt, dtype)
        todo, mine = share_of_work([it.id for it in items], shard_size, rank, world_size, done_everywhere(out_dir))
        bar = tqdm(total=mine, initial=mine - sum(map(len, todo)), desc="caching videos", unit="video",
                   disable=not progress or rank != 0)
        for group in ([items[i] for i in positions] for positions in todo):
            for start in range(0, len(group), batch_size):
                kept, videos = decode_batch(group[start:start + batch_size], writer, frames, height, width, prep)
                if kept:
                    latents = encode_videos(vae, torch.stack(videos))
                    embeds = encode_prompts(tokenizer, text_encoder, [it.caption for it in kept], max_text_len)
                    for item, z, e in zip(kept, latents, embeds):
                        writer.add(item.id, z, e, item.caption)
                bar.update(len(group[start:start + batch_size]))
            if many:
                writer.flush()   # one shard per chunk: the joined index keeps the source's order
        bar.close()
    join_parts(out_dir, [it.id for it in items], rank, world_size, barrier)
    skipped = len(read_index(out_dir)["skipped"]) if many else len(writer.index["skipped"])
    if skipped and rank == 0:
        warnings.warn(f"{skipped} of {len(items)} videos were skipped (unreadable, too short, or no frame rate); "
                      f"they are listed under 'skipped' in {Path(out_dir) / 'index.json'}", stacklevel=2)
    del vae, text_encoder
    free_memory()
    return Path(out_dir)


def free_memory() -> None:
    """Give the memory of dropped models back (CPU garbage, then the CUDA cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
