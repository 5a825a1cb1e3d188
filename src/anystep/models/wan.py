"""Wan teachers and AnyFlow students from diffusers' own classes.

* The teacher (and critic) is diffusers' ``WanTransformer3DModel``: a velocity model taking (B, C, F, H, W)
  and one timestep per sample.
* The student is diffusers' ``AnyFlowTransformer3DModel``, built from the Wan weights: every Wan weight
  copied, ``delta_embedder`` = a copy of ``time_embedder``, gate 0.25, deltatime ``r``. With deltatime ``r``
  and r = t its output equals the teacher's. It takes (B, F, C, H, W) and per-frame (B, F) times.

:class:`WanVelocity` and :class:`AnyFlowStudent` adapt both to anystep's flow-map contract
``u = model(x[B, F, C, H, W], t[B], r[B], text[B, L, D])``, so the algorithms never see the layouts.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel
from torch import nn

# The AnyFlow transformer has no qk_norm / added_kv_proj_dim / pos_embed_seq_len arguments: it always uses
# Wan's "rms_norm_across_heads".
_SHARED_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "image_dim",
                "rope_max_seq_len")


def student_from_wan(wan: WanTransformer3DModel, gate_value: float = 0.25,
                     deltatime_type: str = "r") -> AnyFlowTransformer3DModel:
    """An ``AnyFlowTransformer3DModel`` initialised from a Wan transformer (AnyFlow sec. 3.1, official
    ``setup_flowmap_model``): all weights copied, the delta embedder a copy of the time embedder."""
    cfg = wan.config
    if cfg.qk_norm != "rms_norm_across_heads" or cfg.added_kv_proj_dim is not None:
        raise ValueError("AnyFlowTransformer3DModel supports Wan transformers with qk_norm="
                         f"'rms_norm_across_heads' and no added_kv_proj_dim; got qk_norm={cfg.qk_norm!r}, "
                         f"added_kv_proj_dim={cfg.added_kv_proj_dim!r}")
    student = AnyFlowTransformer3DModel(**{k: cfg[k] for k in _SHARED_KEYS}, gate_value=gate_value,
                                        deltatime_type=deltatime_type)
    state = {k: v.detach().clone() for k, v in wan.state_dict().items()}  # own copies, the teacher's dtype
    prefix = "condition_embedder.time_embedder."
    for key in list(state):
        if key.startswith(prefix):
            state["condition_embedder.delta_embedder." + key[len(prefix):]] = state[key].clone()
    student.load_state_dict(state, strict=True, assign=True)
    return student.train(wan.training)


def wan_from_student(student: AnyFlowTransformer3DModel) -> WanTransformer3DModel:
    """The Wan velocity model inside an AnyFlow transformer whose delta embedder equals its time embedder
    (a merged LoRA teacher: the teacher adapter leaves the embedders alone). At r = t both give the same
    output; the delta embedder is dropped. Raises if the two embedders differ (a trained flow-map student)."""
    cfg = student.config
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    for key in [k for k in state if k.startswith("condition_embedder.delta_embedder.")]:
        twin = key.replace("delta_embedder", "time_embedder")
        if not torch.equal(state.pop(key), state[twin]):
            raise ValueError("this AnyFlow transformer's delta embedder differs from its time embedder: it is a "
                             "flow-map student, not a velocity teacher")
    wan = WanTransformer3DModel(**{k: cfg[k] for k in _SHARED_KEYS}, qk_norm="rms_norm_across_heads")
    wan.load_state_dict(state, strict=True, assign=True)
    return wan.train(student.training)


class _TransformerFlowMap(nn.Module):
    """A diffusers video transformer behind anystep's flow-map contract ``u = model(x, t, r, text)``,
    ``x`` (B, F, C, H, W), ``t``, ``r`` (B,)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        _check_video(x, self.transformer.config.in_channels)
        return self.call(x, t, r, text)


class WanVelocity(_TransformerFlowMap):
    """A Wan transformer as a flow-map model that ignores r (a velocity model: teacher, critic)."""

    def call(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        out = self.transformer(hidden_states=x.permute(0, 2, 1, 3, 4),   # (B, C, F, H, W)
                               timestep=t.to(x.device), encoder_hidden_states=text, return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)                                # (B, F, C, H, W)


class AnyFlowStudent(_TransformerFlowMap):
    """diffusers' AnyFlow transformer as a flow-map model: (B,) times broadcast to per-frame (B, F)."""

    def call(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return anyflow_call(self.transformer, x, t, r, text)


def anyflow_call(transformer, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """An AnyFlow transformer on ``x`` (B, F, C, H, W) with one (t, r) per sample, repeated per frame."""
    frames, t, r = x.shape[1], t.to(x.device), r.to(x.device)
    return transformer(hidden_states=x, timestep=t[:, None].expand(-1, frames), r_timestep=r[:, None].expand(-1, frames),
                       encoder_hidden_states=text, return_dict=False)[0]


def _check_video(x: torch.Tensor, channels: int) -> None:
    if x.ndim != 5 or x.shape[2] != channels:
        raise ValueError(f"expected a video tensor (B, F, C={channels}, H, W), got shape {tuple(x.shape)}")


def tiny_wan(in_channels: int = 3, text_dim: int = 32, heads: int = 4, head_dim: int = 16, layers: int = 4,
             ffn_dim: int = 256, patch: tuple[int, int, int] = (1, 2, 2), **extra: Any) -> WanTransformer3DModel:
    """A small Wan transformer for the shapes world (pixel space, no VAE)."""
    kwargs = {"patch_size": patch, "num_attention_heads": heads, "attention_head_dim": head_dim,
              "in_channels": in_channels, "out_channels": in_channels, "text_dim": text_dim, "freq_dim": 256,
              "ffn_dim": ffn_dim, "num_layers": layers, "cross_attn_norm": True,
              "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64}
    return WanTransformer3DModel(**{**kwargs, **extra})
