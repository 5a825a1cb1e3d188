"""UMT5 prompt embeddings, computed exactly as diffusers' ``WanPipeline`` computes them.

Wan2.1 conditions on the last hidden state of UMT5-XXL. ``WanPipeline._get_t5_prompt_embeds`` cleans each
prompt (ftfy when installed, HTML unescape, whitespace collapse), tokenizes it padded/truncated to
``max_len`` tokens (512 in Wan), runs the encoder with the attention mask, keeps each embedding's first
``len_i`` rows (its true token count, EOS included) and zero-pads back to ``max_len``. ``encode_prompts``
returns the trimmed per-prompt embeddings (that is what the cache stores); ``pad_embeddings`` restores the
zero padding.

The official AnyFlow code uses the embedding of Wan's default negative prompt (``WAN_NEGATIVE_PROMPT``) as
the "null" prompt for 10% text dropout and as the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import torch

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (diffusers' own ``prompt_clean``, so the two can never drift apart)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_len: int = 512,
                   device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Trimmed UMT5 embeddings, one ``(L_i, D)`` float32 CPU tensor per prompt (``L_i <= max_len``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    device = device if device is not None else next(text_encoder.parameters()).device
    tokens = tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=max_len,
                       truncation=True, add_special_tokens=True, return_attention_mask=True,
                       return_tensors="pt")
    mask = tokens.attention_mask
    lengths = mask.gt(0).sum(dim=1).tolist()
    hidden = text_encoder(tokens.input_ids.to(device), mask.to(device)).last_hidden_state
    hidden = hidden.float().cpu()
    return [h[:n].clone() for h, n in zip(hidden, lengths)]


def pad_embeddings(embeddings: list[torch.Tensor], max_len: int) -> torch.Tensor:
    """Stack trimmed ``(L_i, D)`` embeddings into ``(n, max_len, D)``, zero beyond each ``L_i`` (Wan's padding).

    An embedding longer than ``max_len`` is cut to ``max_len`` rows (not the same as encoding with a shorter
    ``max_len``: UMT5 attends both ways)."""
    dim = embeddings[0].shape[-1]
    out = embeddings[0].new_zeros(len(embeddings), max_len, dim)
    for i, emb in enumerate(embeddings):
        n = min(emb.shape[0], max_len)
        out[i, :n] = emb[:n]
    return out
