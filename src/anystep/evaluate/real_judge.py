"""Judging a real-path (wan world) student without downloads: against its teacher's ODE.

The real path has no exact judge, but it has an exact target: the teacher's many-step sample from the same
noise and prompt. :func:`reference_judge` samples that reference once (the teacher's Euler sampler, ``steps``
steps, its CFG scale) and returns a :class:`RealJudge` that scores samples of the same evaluation set by

- ``teacher_latent_rmse``: the RMS distance of the sample's latents to the reference's (lower is better; a flow
  map should approach 0 as N grows, a consistency model need not);
- ``teacher_psnr``: the PSNR (dB) of the decoded sample against the decoded reference;
- ``flicker``: the mean absolute difference of consecutive decoded frames in 0..255 (VBench's temporal
  flickering measures this; lower is steadier, but a frozen video scores 0);
- ``clip_score``: with a local CLIP folder, the CLIP text-video score of the decoded video and its prompt.

Latents are decoded by the model folder's ``AutoencoderKLWan`` after undoing the cache's normalisation
(``z * latents_std + latents_mean``, the inverse of :func:`anystep.data.encode.normalize_latents`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data.encode import latent_stats
from ..errors import UsageError
from ..flowmap import take_rows
from ..worlds.base import EvalSet
from . import video_metrics
from .sweep import Sampler, sample_batched

CHUNK = 4   # clips per teacher / VAE call (a real Wan clip is large)


# ---------------------------------------------------------------------------------------------- decoding
def load_vae(folder: str | Path, device: torch.device | str = "cpu"):
    """The ``AutoencoderKLWan`` of a local Wan2.1 (or AnyFlow) diffusers folder, float32, in eval mode."""
    from diffusers import AutoencoderKLWan

    from ..models.folder import require_local_folder

    folder = require_local_folder(folder, "vae")
    return AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).to(device).eval()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Normalised latents ``(B, F, C, H, W)`` (the denoiser's space) -> videos ``(B, F', 3, H', W')`` in
    [-1, 1] on the CPU: de-normalised per channel, ``z * std + mean``, then the VAE's decoder."""
    if latents.ndim != 5 or latents.shape[2] != vae.config.z_dim:
        raise ValueError(f"expected latents (B, F, C={vae.config.z_dim}, H, W), got shape {tuple(latents.shape)}")
    device = next(vae.parameters()).device
    mean, std = (s.to(device) for s in latent_stats(vae.config))
    out = []
    for i in range(0, latents.shape[0], chunk):
        z = latents[i:i + chunk].to(device, torch.float32).permute(0, 2, 1, 3, 4)    # (B, C, F, H, W)
        video = vae.decode(z * std + mean, return_dict=False)[0]                    # (B, 3, F', H', W')
        out.append(video.clamp(-1, 1).permute(0, 2, 1, 3, 4).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- the judge
class DecodedVideos:
    """How latent samples are pictured: ``"decoded video"``, a grid video of :meth:`decode` of the samples with
    the captions (``ev.meta``) as column titles."""

    picture, picture_samples = "decoded video", 4

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor]):
        self.decode = decode

    def labels(self, ev: EvalSet) -> list[str]:
        return [str(caption) for caption in ev.meta]

    def marks(self) -> torch.Tensor:
        return torch.zeros(0, 2, device="cpu")


def decoded_videos(world: Any, device: torch.device | str = "cpu", batch_size: int = CHUNK) -> DecodedVideos:
    """Pictures of ``world``'s latents, decoded by the VAE of its model folder on ``device``."""
    vae = load_vae(world.model_folder(), device)
    return DecodedVideos(lambda z: decode_latents(vae, z, batch_size))


class RealJudge(DecodedVideos):
    """Scores samples of one evaluation set against the teacher's reference samples of it (module docstring),
    pictured decoded."""

    primary_metric, higher_is_better = "teacher_latent_rmse", False

    def __init__(self, reference: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                 clip: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None, chunk: int = CHUNK):
        super().__init__(decode)
        self.reference = reference.float().cpu()
        self.clip = clip
        self.chunk = chunk
        self.reference_videos = decode(self.reference)

    def score(self, samples: torch.Tensor, ev: EvalSet, guidance: float = 1.0,
              chunk_partition: tuple[int, ...] | None = None) -> dict[str, float]:
        """Batch means of the four metrics (``clip_score`` only with a CLIP folder). ``guidance`` and
        ``chunk_partition`` are not used: the reference already has the teacher's guidance."""
        if samples.shape != self.reference.shape:
            raise ValueError(f"samples {tuple(samples.shape)} are not of the judge's evaluation set "
                             f"{tuple(self.reference.shape)}")
        parts: dict[str, list[torch.Tensor]] = {"teacher_latent_rmse": [video_metrics.latent_rmse(
            samples.float(), self.reference)]}
        for i in range(0, samples.shape[0], self.chunk):
            videos = self.decode(samples[i:i + self.chunk])
            parts.setdefault("teacher_psnr", []).append(
                video_metrics.psnr(videos, self.reference_videos[i:i + self.chunk]))
            parts.setdefault("flicker", []).append(video_metrics.flicker(videos))
            if self.clip is not None:
                parts.setdefault("clip_score", []).append(self.clip(videos, list(ev.meta[i:i + self.chunk])))
        return {k: float(torch.cat(v).float().mean()) for k, v in parts.items()}


def reference_judge(world: Any, teacher: Sampler, ev: EvalSet, *, steps: int, shift: float,
                    clip: str | None = None, device: torch.device | str = "cpu", cache: Path | None = None,
                    progress: bool = False, batch_size: int = CHUNK) -> RealJudge:
    """The judge of ``world``'s samples of ``ev``: the teacher's Euler sampler (``teacher``, on ``device``, with
    its CFG scale against ``world.null_cond``) at ``steps`` steps on ``ev`` is the reference; ``clip`` a local
    CLIP folder for ``clip_score``; ``batch_size`` clips at a time through the teacher, the VAE and CLIP. With ``cache`` (a safetensors file) the reference is read from it when it
    was made for this evaluation set, teacher settings and shift, else sampled and saved there; a cache made
    for anything else is refused."""
    if steps < 1:
        raise UsageError(f"the teacher's reference needs steps >= 1, got {steps}")
    key = reference_key(ev, teacher, steps, shift)
    reference = _read_reference(Path(cache), key) if cache is not None and Path(cache).is_file() else None
    if reference is None:
        reference = sample_reference(world, teacher, ev, steps, shift, device, progress, batch_size)
        if cache is not None:
            _write_reference(Path(cache), reference, key)
    scorer = video_metrics.ClipScorer(clip, device=device) if clip else None
    return RealJudge(reference, decoded_videos(world, device, batch_size).decode, scorer, batch_size)


def sample_reference(world: Any, teacher: Sampler, ev: EvalSet, steps: int, shift: float,
                     device: torch.device | str = "cpu", progress: bool = False,
                     batch_size: int = CHUNK) -> torch.Tensor:
    """The teacher's samples of ``ev`` at ``steps`` steps (on the CPU), ``batch_size`` clips at a time."""
    out = []
    for i in tqdm(range(0, ev.noise.shape[0], batch_size), desc=f"teacher reference ({steps} steps)",
                  disable=not progress, dynamic_ncols=True):
        rows = slice(i, i + batch_size)
        out.append(sample_batched(teacher, world.null_cond, ev.noise[rows], take_rows(ev.cond, rows), steps, shift,
                                  chunk=batch_size, device=device))
    return torch.cat(out)


def reference_key(ev: EvalSet, teacher: Sampler, steps: int, shift: float) -> dict[str, str]:
    """What a saved reference was made for: the evaluation set (a hash of its noises and conditions), the
    teacher's sampler and guidance, the steps and the shift."""
    digest = hashlib.sha256()
    for t in (ev.noise, ev.cond):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return {"eval_set": digest.hexdigest(), "teacher": teacher.name, "mode": teacher.mode,
            "guidance": repr(float(teacher.guidance)), "steps": str(int(steps)), "shift": repr(float(shift))}


def _read_reference(path: Path, key: dict[str, str]) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        saved = f.metadata() or {}
        differ = [k for k in key if saved.get(k) != key[k]]
        if differ:
            raise UsageError(f"the teacher reference {path} was made for another "
                             f"{', '.join(differ)} ({', '.join(f'{k}={saved.get(k)}' for k in differ)}); "
                             "delete it, or keep the reference elsewhere (another cache file; a sweep: another --out)")
        return f.get_tensor("reference")


def _write_reference(path: Path, reference: torch.Tensor, key: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"reference": reference.contiguous()}, str(tmp), metadata=key)
    tmp.replace(path)
