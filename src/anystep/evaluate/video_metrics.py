"""Video metrics that need no downloads: agreement with the teacher, temporal flicker, CLIP text-video score.

* :func:`latent_rmse` and :func:`psnr`: how far a student's N-step sample lies from the teacher's many-step
  sample from the same noise and prompt, in the latent space and (after decoding) in pixels.
* :func:`flicker` and :func:`flicker_score`: VBench's temporal-flickering dimension, the mean absolute
  difference of consecutive frames, computed on tensors instead of decoded mp4 files.
* :class:`ClipScorer`: the CLIP text-video score through transformers, from a local CLIP folder only (never the
  hub); :func:`tiny_clip_folder` writes a tiny random-weight one for tests and offline demos.

Videos are ``(B, F, 3, H, W)`` in [-1, 1] (what the VAE decodes to), latents ``(B, F, C, H, W)``; every result
is a ``(B,)`` tensor on the inputs' device, computed in float32 or better whatever the inputs' dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError

PSNR_DATA_RANGE = 2.0      # videos live in [-1, 1]


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 when given float64: the metrics' arithmetic never runs in bf16/fp16."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: the two tensors differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 5:
        raise ValueError(f"{what} takes (B, F, C, H, W) tensors, got shape {tuple(a.shape)}")


def _check_video(v: torch.Tensor, what: str) -> None:
    if v.dim() != 5 or v.shape[2] != 3:
        raise ValueError(f"{what} takes RGB videos (B, F, 3, H, W) in [-1, 1], got shape {tuple(v.shape)}")


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference over every frame, channel and pixel: (B,)."""
    dt = _math_dtype(a)
    return (a.to(dt) - b.to(dt)).square().flatten(1).mean(1)


def latent_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root mean square difference per sample, sqrt(mean over F, C, H, W of (a - b)^2): (B,).

    a, b: (B, F, C, H, W) latents, e.g. a student's N-step sample and the teacher's many-step sample from the
    same noise and prompt.
    """
    _check_pair(a, b, "latent_rmse")
    return _mse(a, b).sqrt()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample, 10 log10(R^2 / MSE) with data range R = 2: (B,).

    a, b: decoded videos (B, F, 3, H, W) in [-1, 1]. The MSE is taken over all frames at once (one number per
    video, not a mean of per-frame PSNRs). Identical videos have MSE 0 and PSNR ``inf``; a caller averaging over
    samples should take that into account (e.g. report the mean MSE's PSNR, or the median).
    """
    _check_pair(a, b, "psnr")
    _check_video(a, "psnr")
    return 10 * torch.log10(PSNR_DATA_RANGE ** 2 / _mse(a, b))


def flicker(videos: torch.Tensor) -> torch.Tensor:
    """Temporal flicker per video: the mean absolute difference of consecutive frames on the 0..255 scale: (B,).

    This is the raw quantity behind VBench's ``temporal_flickering`` dimension (``vbench/temporal_flickering.py``
    in github.com/Vchitect/VBench): VBench reads the mp4's frames as uint8, takes for each pair of consecutive
    frames the mean absolute difference over pixels and channels, averages those over the pairs and reports
    ``(255 - that mean) / 255`` (see :func:`flicker_score`). All pairs have the same number of pixels, so the
    mean over pairs of the per-pair means is the mean over all differences, computed here in one go. Ours works
    on the exact values, (x + 1) * 127.5, not on frames rounded to uint8 and re-encoded as mp4, so a file's
    VBench value can differ from this by the quantisation and compression. Lower is steadier; 0 = static.
    VBench scores this dimension on videos of static scenes only (its prompts for it say "still", and its
    protocol filters out videos that move): on a moving video this measures motion as much as flicker.

    videos: (B, F, 3, H, W) in [-1, 1] with F >= 2.
    """
    _check_video(videos, "flicker")
    if videos.shape[1] < 2:
        raise ValueError(f"flicker needs videos of at least 2 frames (it compares consecutive frames), got "
                         f"{videos.shape[1]}")
    x = (videos.to(_math_dtype(videos)) + 1) * 127.5
    return (x[:, 1:] - x[:, :-1]).abs().flatten(1).mean(1)


def flicker_score(videos: torch.Tensor) -> torch.Tensor:
    """VBench's reported temporal-flickering score per video, (255 - :func:`flicker`) / 255: (B,).

    1 for a static video, lower for more change between frames (VBench's normalisation range for the dimension
    is [0.6293, 1.0]). :func:`flicker` is the raw mean absolute difference this score is made from.
    """
    return (255 - flicker(videos)) / 255


def _load_clip_parts(folder: Path):
    """CLIPModel, tokenizer and the image mean/std from a local folder; UsageError naming what is missing."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if not folder.is_dir():
        raise UsageError(f"CLIP folder {str(folder)!r} does not exist (give a local CLIP model folder, e.g. "
                         "one saved by CLIPModel.save_pretrained with its tokenizer)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{str(folder)!r} is not a CLIP model folder: it has no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "clip":
        raise UsageError(f"{str(folder)!r} holds a {model_type!r} model, not a CLIP model (model_type 'clip')")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the CLIP model and tokenizer from {str(folder)!r}: {err}") from err
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    return model.eval(), tokenizer, mean, std


class ClipScorer:
    """The CLIP text-video score of videos against their prompts, from a local CLIP folder.

    For each frame: resize the shorter side to the model's image size S (bicubic, antialiased) and crop the
    central S x S, as CLIP's own image processor does; map [-1, 1] to [0, 1] and normalise with the folder's
    image mean/std (``preprocessor_config.json``; CLIP's standard constants when it has none). The score is
    ``100 * cos(image embedding, text embedding)`` averaged over the frames: 100 as in torchmetrics' CLIPScore,
    but without its clamp at 0, so that the score stays the linear mean of the cosines (a trained CLIP's
    cosines of real frames and prompts are positive, where both agree).

    folder: a CLIP folder (config.json with model_type 'clip', weights, tokenizer files); nothing is
    downloaded. device: where the model runs; the videos are moved there and the scores come back there.
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.model, self.tokenizer, mean, std = _load_clip_parts(self.folder)
        self.model.to(self.device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> CLIP's pixel values (N, 3, S, S): resize, centre crop, normalise."""
        s = self.image_size
        h, w = frames.shape[-2:]
        scale = s / min(h, w)
        size = (max(s, round(h * scale)), max(s, round(w * scale)))
        x = (frames.float() + 1) / 2
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - s) // 2, (size[1] - s) // 2
        x = x[..., top:top + s, left:left + s]
        return (x - self.mean) / self.std

    @staticmethod
    def _features(out) -> torch.Tensor:
        """get_*_features return a tensor (transformers 4) or an output whose pooler_output is it (5)."""
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_embeddings(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) in [-1, 1] -> unit image embeddings per frame (B, F, D)."""
        b, f = videos.shape[:2]
        pix = self.pixels(videos.to(self.device).flatten(0, 1))
        emb = self._features(self.model.get_image_features(pixel_values=pix))
        return F.normalize(emb.float(), dim=-1).view(b, f, -1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> unit text embeddings (B, D); prompts longer than the model's context are truncated."""
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        emb = self._features(self.model.get_text_features(input_ids=tok.input_ids,
                                                          attention_mask=tok.attention_mask))
        return F.normalize(emb.float(), dim=-1)

    def __call__(self, videos: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """100 x the frame-averaged cosine similarity of each video with its prompt: (B,) on ``device``."""
        _check_video(videos, "ClipScorer")
        if isinstance(texts, str) or len(texts) != videos.shape[0]:
            raise ValueError(f"ClipScorer needs one prompt per video: {videos.shape[0]} videos, "
                             f"{1 if isinstance(texts, str) else len(texts)} prompts")
        img = self.image_embeddings(videos)
        txt = self.text_embeddings(texts)
        return 100 * torch.einsum("bfd,bd->bf", img, txt).mean(1)


def _tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer with no merges (one token per byte, a word's last byte marked ``</w>``)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    return CLIPTokenizer(str(vocab_file), str(merges_file))


def tiny_clip_folder(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random-weight CLIP folder at ``path`` (model, tokenizer, preprocessor config); returns it.

    Built locally (nothing downloaded): two-layer text and vision towers of width 32, a byte-level tokenizer
    with no merges, patches of 8 pixels on ``image_size`` images. For tests and offline examples of
    :class:`ClipScorer`; its scores mean nothing.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_clip_tokenizer(path)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 32,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**tower, "image_size": image_size, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(path)
    tokenizer.model_max_length = 32
    tokenizer.save_pretrained(path)
    # CLIPImageProcessor's config, written by hand (transformers 5's class wants torchvision and warns without
    # it); mean/std differ from CLIP's standard constants on purpose, so that a test sees they are read
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, indent=2))
    (path / "README.md").write_text(f"A tiny random-weight CLIP made by anystep's tiny_clip_folder(seed={seed}); "
                                    "for tests and offline examples, its scores mean nothing.\n")
    return path

