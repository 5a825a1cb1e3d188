"""The sizes of anystep's networks, as configs: the toy worlds' network families and the causal (FAR) student's
layout. Kept apart from the networks (no diffusers import), so a config is read without loading a model."""

from __future__ import annotations

from dataclasses import dataclass

from ..causal import chunk_bounds

CAUSAL_ATTENTION = ("auto", "dense", "flex")


@dataclass
class MLPConfig:
    """The gmm world's network (:class:`~anystep.models.toy.ToyFlowMapNet`)."""

    hidden: int = 256
    depth: int = 4
    max_freq: float = 50.0     # the time embedding's highest frequency (a low one keeps the difference exact)


@dataclass
class ToyWanConfig:
    """The shapes world's network: a tiny diffusers ``WanTransformer3DModel`` (the shipped teacher's sizes)."""

    patch: tuple[int, int, int] = (1, 4, 4)
    heads: int = 4
    head_dim: int = 16
    layers: int = 4
    ffn_dim: int = 256


FAMILIES: dict[str, type | None] = {"mlp": MLPConfig, "toy_wan": ToyWanConfig, "wan": None}
TRANSFORMER_FAMILIES = ("toy_wan", "wan")     # Wan transformers: LoRA roles and causal (FAR) students


@dataclass
class CausalModelConfig:
    """How a causal (FAR) student is built from a bidirectional model (official sec. 5 defaults)."""

    chunk_partition: tuple[int, ...] = (1, 3, 3, 3, 3, 3, 3, 2)   # latent frames per chunk (official: 21)
    full_chunk_limit: int = 3                  # newest chunks at full resolution; older ones compressed
    compressed_patch_size: tuple[int, int, int] | None = None     # None: the patch with H, W doubled (1x4x4)
    attention: str = "auto"                    # causal attention: 'auto' (flex on CUDA, dense SDPA on CPU),
                                               # 'dense' or 'flex'
    flex_compile: bool | None = None           # flex through torch.compile (None: yes; false: eager flex)

    def __post_init__(self):
        chunk_bounds(self.chunk_partition)     # validates
        if self.full_chunk_limit < 2:
            raise ValueError(f"model.causal.full_chunk_limit must be >= 2, got {self.full_chunk_limit}")
        if self.attention not in CAUSAL_ATTENTION:
            raise ValueError(f"model.causal.attention must be one of {CAUSAL_ATTENTION}, got {self.attention!r}")
        if self.flex_compile is not None and self.attention == "dense":
            raise ValueError("model.causal.flex_compile picks how flex attention runs; with "
                             "model.causal.attention=dense no call runs flex: leave it unset")

    @property
    def compiled_flex(self) -> bool:
        """Whether the flex calls (attention 'auto' on CUDA, 'flex') run a ``torch.compile``-d flex_attention
        (one fused kernel per sequence length, as the official code) rather than diffusers' eager call, which
        materialises the whole score matrix (:mod:`anystep.models.far_attention`)."""
        return self.flex_compile is not False
