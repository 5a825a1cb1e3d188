"""Selective activation checkpointing (anystep.models.checkpointing): ``train.checkpoint_fraction`` and
``train.checkpoint_save``.

Equivalence: a tiny Wan's loss and gradients (fp32) are those of a run without checkpointing, for a plain
transformer and for the LoRA shared base (its adapters switching between forward and backward). Action: the
blocks recomputed in backward are counted with forward hooks and the attention kernels run in backward with a
dispatch mode, so a lever that is silently off fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from anystep.build import build_trainer
from anystep.config import ConfigError, resolve
from anystep.models.checkpointing import BlockCheckpointing, enable_block_checkpointing
from anystep.models.roles import SharedBase
from anystep.models.wan import AnyFlowStudent, student_from_wan, tiny_wan

LAYERS = 4
# (fraction, save) -> blocks recomputed in backward; None: no checkpointing
SETTINGS = {None: 0, (1.0, "none"): 4, (0.5, "none"): 2, (1.0, "attention"): 4, (0.5, "attention"): 2,
            (0.0, "none"): 0}


def _wan():
    torch.manual_seed(0)
    wan = tiny_wan(heads=2, head_dim=8, layers=LAYERS, ffn_dim=32, text_dim=32)
    with torch.no_grad():   # Wan zero-inits some layers; make every weight matter
        for p in wan.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return wan


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 2, 3, 8, 8, generator=g), torch.tensor([937.5, 312.5]), torch.tensor([833.3, 0.0]),
            torch.randn(2, 4, 32, generator=g))


class AttentionRuns(TorchDispatchMode):
    """Counts the forward attention kernels (torch SDPA's fused ops) run inside the block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        self.count += name.startswith("_scaled_dot_product") and "backward" not in name
        return func(*args, **(kwargs or {}))


def _full_model(setting):
    """A plain (full fine-tune) AnyFlow student on the tiny Wan, every parameter trained."""
    model = AnyFlowStudent(student_from_wan(_wan()))
    if setting is not None:
        enable_block_checkpointing(model.transformer, *setting)
    return model, model.transformer, list(model.parameters())


def _lora_model(setting):
    """The student view of a LoRA shared base, its adapters (and the critic's) random."""
    shared = SharedBase.from_wan(_wan(), rank=4, alpha=8.0)
    student, critic = shared.role("student"), shared.role("critic")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*student.parameters(), *critic.parameters()]:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    if setting is not None:
        shared.enable_gradient_checkpointing(*setting)
    return student, shared.base, [*student.parameters(), *critic.parameters()], critic


def _step(make, setting):
    """Forward (with a critic call between the student's forward and backward for the LoRA base), then backward:
    the loss, the gradients, which blocks ran in backward and how many attention kernels."""
    built = make(setting)
    model, net, params = built[:3]
    x, t, r, text = _inputs()
    loss = model(x, t, r, text).square().mean()
    if len(built) == 4:   # DMD's order: another adapter is active when backward recomputes
        loss = loss + built[3](x, t, t, text).square().mean()
    ran = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(net.blocks)]
    with AttentionRuns() as attention:
        loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), [p.grad.clone() for p in params], ran, attention.count


@pytest.mark.parametrize("make", [_full_model, _lora_model], ids=["full", "lora"])
def test_levers_change_no_loss_or_gradient(make):
    loss0, grads0, _, _ = _step(make, None)
    for setting in SETTINGS:
        loss, grads, _, _ = _step(make, setting)
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0, msg=str(setting))
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7, msg=str(setting))


@pytest.mark.parametrize("make", [_full_model, _lora_model], ids=["full", "lora"])
def test_backward_recomputes_the_first_blocks_and_no_kept_attention(make):
    """Blocks run again in backward: the first round(f * 4); attention kernels run again: two per recomputed
    block (self- and cross-attention) when the block is recomputed whole, none when their outputs are kept.
    The LoRA base's critic call adds its own blocks in the same backward."""
    calls = 2 if make is _lora_model else 1   # the student's forward, the critic's
    for setting, blocks in SETTINGS.items():
        _, _, ran, attention = _step(make, setting)
        assert sorted(ran) == sorted(list(range(blocks)) * calls), (setting, ran)
        whole = setting is not None and setting[1] == "none"
        assert attention == (2 * blocks * calls if whole else 0), (setting, attention)


def test_keeping_attention_where_no_fused_kernel_runs_is_an_error():
    """torch SDPA's math path is matmuls and a softmax: nothing to keep; the lever says so."""
    model, _, _ = _full_model((1.0, "attention"))
    x, t, r, text = _inputs()
    with sdpa_kernel(SDPBackend.MATH), pytest.raises(RuntimeError, match="ran no fused attention kernel"):
        model(x, t, r, text)


def test_config_reaches_the_transformer_and_refuses_what_cannot_act():
    gc = "train.gradient_checkpointing=true"
    cfg = resolve("shapes_stage1", [gc, "train.checkpoint_fraction=0.5", "train.checkpoint_save=attention",
                                    "train.steps=1"])
    transformer = build_trainer(cfg, progress=False).method.roles["student"].transformer
    func = transformer._gradient_checkpointing_func
    assert isinstance(func, BlockCheckpointing) and (func.fraction, func.save) == (0.5, "attention")
    assert func.recomputed == {id(b) for b in transformer.blocks[:round(0.5 * len(transformer.blocks))]}
    with pytest.raises(ConfigError, match="needs train.gradient_checkpointing=true"):
        resolve("shapes_stage1", ["train.checkpoint_save=attention"])
    with pytest.raises(ConfigError, match=r"checkpoint_fraction must lie in \[0, 1\]"):
        resolve("shapes_stage1", [gc, "train.checkpoint_fraction=2"])
    with pytest.raises(ConfigError, match="checkpoint_save must be one of"):
        resolve("shapes_stage1", [gc, "train.checkpoint_save=everything"])
    with pytest.raises(ConfigError, match="networks have none"):
        build_trainer(resolve("gmm_teacher", [gc, "train.checkpoint_fraction=0.5"]), progress=False)
    with pytest.raises(ConfigError, match="runs none"):
        build_trainer(resolve("shapes_stage1", [gc, "train.checkpoint_save=attention",
                                                "train.attention_backend=_native_math"]), progress=False)
    with pytest.raises(ConfigError, match="causal"):
        build_trainer(resolve("shapes_far_stage1", [gc, "train.checkpoint_save=attention"]), progress=False)
    with pytest.raises(ConfigError, match="compile"):
        build_trainer(resolve("shapes_stage1", [gc, "train.checkpoint_save=attention", "train.compile=blocks"]),
                      progress=False)
