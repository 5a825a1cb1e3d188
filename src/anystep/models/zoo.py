"""The model zoo: how the worlds' networks are built, and how a trained network is described so that it is
rebuilt from its checkpoint alone (the architecture travels with the weights; it is never re-read from the
config of the run that loads it).

* **Network families** (a world names its family and gives its inputs): ``mlp``, the gmm world's
  :class:`~anystep.models.toy.ToyFlowMapNet` (:class:`MLPConfig`); ``toy_wan``, a tiny diffusers
  ``WanTransformer3DModel`` in pixel space, the shapes world's (:class:`ToyWanConfig`); ``wan``, the transformer
  of a local Wan2.1 diffusers folder (no config: the folder is the architecture).
* **Role modules**: a velocity model (teacher, critic), a flow-map student made from one (:func:`student_from`:
  the interpolated-embedding student of AnyFlow sec. 3.1) and a causal student (:func:`causal_student_from`).
  :func:`describe` turns each into a JSON-able description and :func:`build` back into the module (random
  weights, to be loaded).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .architectures import FAMILIES, CausalModelConfig, MLPConfig, ToyWanConfig  # noqa: F401 (re-exported)
from .far import CausalStudent, causal_student_network
from .toy import ToyFlowMapNet
from .wan import AnyFlowStudent, WanVelocity, student_from_wan, tiny_wan


def velocity_network(family: str, cfg: Any, inputs: dict[str, Any]) -> nn.Module:
    """A fresh velocity network of ``family`` with ``cfg`` (its config class) for a world's ``inputs``
    (``mlp``: shape, num_classes; ``toy_wan``: in_channels, text_dim; ``wan``: folder, dtype)."""
    if family == "mlp":
        return ToyFlowMapNet(inputs["shape"], inputs["num_classes"], hidden=cfg.hidden, depth=cfg.depth,
                             max_freq=cfg.max_freq)
    if family == "toy_wan":
        return WanVelocity(tiny_wan(in_channels=inputs["in_channels"], text_dim=inputs["text_dim"], heads=cfg.heads,
                                    head_dim=cfg.head_dim, layers=cfg.layers, ffn_dim=cfg.ffn_dim,
                                    patch=tuple(cfg.patch)))
    if family == "wan":
        from diffusers import WanTransformer3DModel

        from .folder import load_transformer
        transformer = load_transformer(inputs["folder"], dtype=inputs.get("dtype") or torch.float32)
        if not isinstance(transformer, WanTransformer3DModel):
            raise TypeError(f"{inputs['folder']} holds a {type(transformer).__name__}, not a Wan transformer")
        return WanVelocity(transformer)
    raise KeyError(f"unknown network family {family!r}; known: {sorted(FAMILIES)}")


def student_from(velocity: nn.Module, gate_value: float = 0.25, deltatime_type: str = "r") -> nn.Module:
    """The flow-map student of a velocity network (its own copy of the weights): the delta-time embedder a
    copy of the time embedder, ``e = (1 - g) E_t(t) + g E_r(r)``, so at r = t it is the velocity network."""
    if isinstance(velocity, ToyFlowMapNet):
        if deltatime_type != "r":
            raise ValueError("the gmm network supports deltatime_type 'r' only")
        student = copy.deepcopy(velocity).to_flowmap()
        student.gate = gate_value
        return student
    if isinstance(velocity, WanVelocity):
        return AnyFlowStudent(student_from_wan(velocity.transformer, gate_value, deltatime_type))
    raise TypeError(f"no flow-map student for a {type(velocity).__name__}")


def zero_init_delta(student: nn.Module) -> nn.Module:
    """The paper's baseline for interpolated timestep conditioning (Fig. 7): a new, zero-initialised ``r``
    projection added to the pretrained time embedding, ``e = E(t) + g E'_r(r)`` with ``E'_r``'s output layer
    zero. In the gated form ``e = (1 - g) E_t(t) + g E_r(r)`` that is ``E_t`` := ``E / (1 - g)`` (its output layer
    scaled) and ``E_r``'s output layer zeroed: at the start ``e = E(t)`` for every ``r``, the velocity network."""
    time, delta, gate = _embedders(student)
    with torch.no_grad():
        time.linear_2.weight.div_(1 - gate)
        time.linear_2.bias.div_(1 - gate)
        delta.linear_2.weight.zero_()
        delta.linear_2.bias.zero_()
    return student


def _embedders(student: nn.Module) -> tuple[nn.Module, nn.Module, float]:
    """A flow-map student's time and delta embedders and its gate g."""
    if isinstance(student, ToyFlowMapNet):
        return student.time_embedder, student.delta_embedder, student.gate
    if isinstance(student, AnyFlowStudent):
        embedder = student.transformer.condition_embedder
        return embedder.time_embedder, embedder.delta_embedder, float(student.transformer.config.gate_value)
    raise TypeError(f"no timestep embedders to initialise in a {type(student).__name__}")


def causal_student_from(velocity: nn.Module, causal: CausalModelConfig, gate_value: float = 0.25,
                        deltatime_type: str = "r") -> CausalStudent:
    """The causal (FAR) student of a Wan velocity network (official sec. 5: built from the bidirectional
    weights in the Stage-1 run)."""
    if not isinstance(velocity, WanVelocity):
        raise TypeError(f"a causal student is built from a Wan transformer, not a {type(velocity).__name__}")
    return CausalStudent(causal_student_network(velocity.transformer, causal, gate_value, deltatime_type))


# ---------------------------------------------------------------------------------------------- descriptions
_WRAPPERS = {"wan_velocity": WanVelocity, "anyflow_student": AnyFlowStudent, "causal_student": CausalStudent}


def describe(module: nn.Module) -> dict[str, Any]:
    """A JSON-able description of a role module from which :func:`build` makes the same network."""
    if isinstance(module, ToyFlowMapNet):
        return {"network": "mlp", **module.config, "gate": module.gate, "flowmap": module.flowmap}
    for name, wrapper in _WRAPPERS.items():
        if type(module) is wrapper:
            transformer = module.transformer
            config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
            return {"network": name, "class": type(transformer).__name__, "config": config}
    raise TypeError(f"no description for a {type(module).__name__}")


def build(description: dict[str, Any], causal_attention: str = "auto") -> nn.Module:
    """The module of a :func:`describe` description, with fresh weights (causal attention: ``"auto"``)."""
    import diffusers

    spec = dict(description)
    network = spec.pop("network")
    if network == "mlp":
        gate, flowmap = spec.pop("gate"), spec.pop("flowmap")
        net = ToyFlowMapNet(**spec)
        net.gate, net.flowmap = gate, flowmap
        return net
    if network not in _WRAPPERS:
        raise KeyError(f"unknown network {network!r} in a saved description")
    transformer = getattr(diffusers, spec["class"]).from_config(spec["config"])
    if network == "causal_student":
        from .far_attention import set_causal_attention
        set_causal_attention(transformer, causal_attention)
    return _WRAPPERS[network](transformer)
