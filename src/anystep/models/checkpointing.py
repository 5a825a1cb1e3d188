"""Activation checkpointing of transformer blocks: which blocks backward recomputes, and what it keeps.

Full checkpointing (the official setting) keeps only each block's input and recomputes the whole block in
backward, attention included. Two levers trade memory back for that recomputation:

* ``fraction``: only the first ``round(fraction * num_blocks)`` blocks are recomputed; the others run plainly
  and keep their activations (1.0: every block, as the official code);
* ``save="attention"``: inside a recomputed block, the outputs of the attention kernels are kept (torch's
  selective checkpoint, :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`), so backward
  recomputes the linears and element-wise ops but not attention (two thirds of Wan2.1-1.3B's FLOPs at 32,760
  tokens); the cost is the attention output (and its log-sum-exp) of each block.

Neither changes a number: backward recomputes exactly what forward computed. :class:`BlockCheckpointing` is the
``gradient_checkpointing_func`` diffusers' ``enable_gradient_checkpointing`` takes (called as
``func(block, *args)`` for every block of the forward), and the LoRA shared base
(:class:`~anystep.models.roles.SharedBase`) calls it with the function that re-activates the forward's adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

SAVES = ("none", "attention")

_aten = torch.ops.aten
# The fused scaled-dot-product-attention kernels (what torch's SDPA and diffusers' native backends run). Its
# math path is no kernel of its own (it is decomposed into matmuls and a softmax before any policy sees it):
# a block that runs only that has nothing to keep, which BlockCheckpointing reports as an error.
ATTENTION_OPS = frozenset(
    getattr(_aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
        "_efficient_attention_forward")
    if hasattr(_aten, name))


def check_levers(fraction: float, save: str) -> None:
    """ValueError unless 0 <= ``fraction`` <= 1 and ``save`` is one of :data:`SAVES`."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"checkpoint fraction must lie in [0, 1], got {fraction}")
    if save not in SAVES:
        raise ValueError(f"checkpoint save must be one of {list(SAVES)}, got {save!r}")


class BlockCheckpointing:
    """``func(block, *args, run=block)``: ``run(*args)``, recomputed in backward when ``block`` is among the
    first ``round(fraction * len(blocks))`` of ``blocks`` (with ``save="attention"``, keeping the attention
    kernels' outputs), else run plainly. ``run``: the function that computes the block (default: the block)."""

    def __init__(self, blocks: nn.ModuleList, fraction: float = 1.0, save: str = "none"):
        check_levers(fraction, save)
        self.fraction, self.save = fraction, save
        self.recomputed = {id(b) for b in list(blocks)[:round(fraction * len(blocks))]}
        self._checked: set[int] = set()   # blocks whose forward was seen to keep an attention output
        self._kept = 0

    def __call__(self, block: nn.Module, *args, run: Callable | None = None):
        run = block if run is None else run
        if id(block) not in self.recomputed:
            return run(*args)
        if self.save == "none":
            return checkpoint(run, *args, use_reentrant=False)
        kept = self._kept
        out = checkpoint(run, *args, use_reentrant=False,
                         context_fn=partial(create_selective_checkpoint_contexts, self._policy))
        if id(block) not in self._checked and torch.is_grad_enabled():
            if self._kept == kept:
                raise RuntimeError(f"checkpoint save='attention': block {type(block).__name__} ran no fused "
                                   "attention kernel (torch SDPA's math path, or an attention backend outside "
                                   "torch), so there was nothing to keep; use a fused SDPA backend or save='none'")
            self._checked.add(id(block))
        return out

    def _policy(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in ATTENTION_OPS:
            self._kept += not ctx.is_recompute
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def enable_block_checkpointing(transformer: nn.Module, fraction: float = 1.0, save: str = "none") -> None:
    """Checkpointing of a diffusers transformer's ``blocks`` with these levers (1.0 / 'none': every block,
    wholly recomputed, as diffusers' own)."""
    transformer.enable_gradient_checkpointing(BlockCheckpointing(_blocks(transformer), fraction, save))


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(transformer).__name__} has no list of transformer blocks ('blocks') to checkpoint")
    return blocks
