"""FSDP2 (``train.parallel=fsdp``): every network of a run sharded over the processes.

``fully_shard`` (torch's FSDP2) is applied to each transformer block and then to the network's root, for every
role: the trained ones and the frozen base or teacher (a 14B base in bf16 is 28 GB per copy; sharded over 8 GPUs,
3.5 GB each). With several nodes the mesh is hybrid, as in the official code: shards within a node, replicas
across nodes. With ``train.mixed_precision=bf16`` the gathered weights are bf16 (the official "fp32 master
weights, bf16 compute") and gradients are reduced in fp32. FSDP2 reduces the gradients itself; anystep sets its
divide factor to 1 and scales each micro-batch's loss to its share of the global mean, as for ``ddp``.

Checkpoints keep one format whatever the parallelism: every process gathers the full tensors (a collective),
rank 0 writes them as a one-process run does, and a resume (on any number of processes, sharded or not) cuts
the saved tensors back to each process's shard. Exports, sweeps and later runs read them as always.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..models.roles import networks
from .distributed import Processes


def _mesh(processes: Processes, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes.world_size))
    if processes.world_size > local:   # hybrid: replicate across nodes, shard within one
        return init_device_mesh(device.type, (processes.world_size // local, local),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (processes.world_size,))


def shard_roles(roles: dict[str, Any], processes: Processes, device: torch.device, bf16: bool) -> None:
    """``fully_shard`` every block (each ``blocks`` list) and root of the roles' networks, in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(processes, device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for root in networks(roles.values()):
        for name, child in root.named_modules():
            if name.split(".")[-1] == "blocks" and isinstance(child, nn.ModuleList):
                for block in child:
                    fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(root, mesh=mesh, mp_policy=policy)
        for module in root.modules():
            if hasattr(module, "set_gradient_divide_factor"):   # summed: each loss is scaled to its share
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)   # plain SUM (gloo has no PREMUL_SUM)
    for module in roles.values():   # LoRA views hold their adapters' Parameters: re-read the sharded ones
        shared = getattr(module, "shared", None)
        if shared is not None:
            shared._collect()


def sharded(params: Iterable[torch.Tensor]) -> bool:
    return any(isinstance(p, DTensor) for p in params)


def full(value: Any) -> Any:
    """``value`` (tensors, dicts, lists) with every sharded tensor gathered whole, on the CPU. A collective:
    every process calls it, in the same order."""
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` gathered whole on its device (a collective when it is sharded)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole ``tensor`` as ``target`` holds it: cut to this process's shard when ``target`` is sharded."""
    if isinstance(target, DTensor):
        return distribute_tensor(tensor.to(target.device, target.dtype), target.device_mesh, target.placements)
    return tensor


@torch.no_grad()
def load_whole(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into a (sharded) module's parameters and buffers (keys checked by the caller)."""
    own = module.state_dict(keep_vars=True)
    for key, value in state.items():
        own[key].copy_(like(value, own[key]))


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved (whole) optimizer state dict with each per-parameter tensor cut like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        p = params[int(index)]
        out["state"][index] = {k: like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                               for k, v in entry.items()}
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``t`` (``t`` itself when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t
