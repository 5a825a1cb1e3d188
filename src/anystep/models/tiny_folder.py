"""A tiny Wan2.1 text-to-video diffusers folder, built offline from random weights.

It has the layout of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (``model_index.json``, ``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) with every part a few thousand parameters: a tiny
``WanTransformer3DModel``, a tiny ``AutoencoderKLWan`` (4x temporal, 8x spatial compression, 16 latent
channels, like the real one), a tiny ``UMT5EncoderModel`` and a byte-level tokenizer that needs no download.
The real-model commands (``anystep cache``, ``synthesize``, training with ``world.name=wan``, ``export``)
run on it in seconds, which is how the test suite checks the whole chain without the model hub.

    anystep tiny-wan runs/tiny_wan      # or: build_tiny_wan_folder("runs/tiny_wan")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) and T5's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def tiny_wan_components(seed: int = 0, layers: int = 2, heads: int = 2, head_dim: int = 16,
                        ffn_dim: int = 64) -> dict:
    """The five parts of a tiny Wan2.1 T2V pipeline, seeded."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=ffn_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    tokenizer = tiny_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    # Wan2.1's own scheduler: UniPC in flow-prediction mode (shift 3 for 480p in the released folders)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0, num_train_timesteps=1000)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "tokenizer": tokenizer, "scheduler": scheduler}


def build_tiny_wan_folder(path: str | Path, seed: int = 0, **sizes) -> Path:
    """Write a tiny Wan2.1 T2V diffusers folder at ``path`` (loadable by ``WanPipeline.from_pretrained``)."""
    from diffusers import WanPipeline

    path = Path(path)
    WanPipeline(**tiny_wan_components(seed, **sizes)).save_pretrained(path)
    (path / "README.md").write_text("A tiny random-weight Wan2.1 T2V folder made by anystep's "
                                    f"build_tiny_wan_folder(seed={seed}); for tests and offline examples.\n")
    json.loads((path / "model_index.json").read_text())  # written and readable
    return path


def write_tiny_clips(folder: str | Path, n: int = 3, frames: int = 17, height: int = 32, width: int = 32,
                     speed: int = 1) -> Path:
    """``n`` tiny mp4 clips of a red block moving right (``speed`` pixels per frame) on a grey background, with
    ``captions.json``: videos for ``anystep cache`` on the tiny folder, offline."""
    import imageio.v2 as imageio
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True)
    top, side = height // 4, max(width // 3, 4)
    captions = {}
    for i in range(n):
        video = []
        for f in range(frames):
            a = np.full((height, width, 3), 20 * i, np.uint8)
            a[top:top + height // 3, speed * f + i:speed * f + i + side] = (255, 60 * i, 0)
            video.append(a)
        imageio.mimwrite(folder / f"clip{i}.mp4", video, fps=8, macro_block_size=1)
        captions[f"clip{i}.mp4"] = f"a red block moving right, clip {i}"
    (folder / "captions.json").write_text(json.dumps(captions))
    return folder
