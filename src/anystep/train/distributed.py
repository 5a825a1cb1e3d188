"""Many processes, one run: the process group that ``torchrun`` starts, and what the loop needs of it.

``torchrun --nproc-per-node=K -m anystep stage1 ...`` starts K copies of the command; each finds its rank in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins one process group (NCCL on CUDA, gloo on the
CPU), on its own device (``cuda:LOCAL_RANK``). Every process holds the whole model (``ddp``: replicated), draws
the same global batch and computes its rows (:mod:`anystep.global_batch`); after the backward passes of its
micro-batches the gradients of what trains are summed over the processes, so every replica takes the same
optimizer step. Only rank 0 writes (logs, progress, checkpoints); the others wait for it where a file must
exist before they go on.

Why not ``torch.nn.parallel.DistributedDataParallel``: anystep's methods call a role several times per step
(the central-difference points and the null branch without gradient, the rollout's segments with it) and
accumulate micro-batches; DDP ties one forward call to one backward pass. The gradients are reduced here in
large flat buckets after the backward passes (no overlap with them: the cost on a GPU is measured in the
benchmarks). The frozen base is never reduced: only the parameters that require a gradient.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 32 * 2**20      # gradients are summed in flat buckets of at most this many elements


@dataclass(frozen=True)
class Processes:
    """This process's place in a run: rank ``rank`` of ``world_size`` (one process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes (rank 0)."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.many:
            dist.barrier()

    def decide(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run by rank 0 alone, its result on every process; a UsageError it raises is raised on every
        process (so no process waits for one that failed)."""
        from ..errors import UsageError

        result, error = None, None
        if self.main:
            try:
                result = fn()
            except UsageError as err:
                if not self.many:
                    raise
                error = (type(err), str(err))
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error[0](error[1])
        return result

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (a small picklable object)."""
        if not self.many:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all(self, flag: torch.Tensor) -> bool:
        """Whether ``flag`` (a boolean scalar tensor) holds on every process."""
        if not self.many:
            return bool(flag)
        value = flag.detach().to(torch.int32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the processes, in place. Every process must hold gradients for
        the same parameters (a RuntimeError names the mismatch)."""
        if not self.many:
            return
        grads = [p.grad for p in params if p.grad is not None]
        self._check_same_count(len(grads), grads[0].device if grads else torch.device("cpu"))
        for bucket in _buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def _check_same_count(self, count: int, device: torch.device) -> None:
        both = torch.tensor([count, -count], dtype=torch.float64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if int(both[0]) != count or int(-both[1]) != count:
            raise RuntimeError(f"rank {self.rank} has gradients for {count} parameters, another rank for "
                               f"{int(both[0]) if int(both[0]) != count else int(-both[1])}: the processes did not "
                               "run the same computation")

    def mean_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Each statistic averaged over the processes that report it (every process gets the result)."""
        if not self.many:
            return stats
        gathered: list[dict[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, stats)
        keys = dict.fromkeys(k for s in gathered for k in s)
        return {k: sum(s[k] for s in gathered if k in s) / sum(k in s for s in gathered) for k in keys}


SINGLE = Processes()


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Gradients grouped by dtype and device into buckets of at most :data:`BUCKET_ELEMENTS` elements."""
    out: list[list[torch.Tensor]] = []
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.dtype, g.device), []).append(g)
    for group in groups.values():
        bucket, size = [], 0
        for g in group:
            if bucket and size + g.numel() > BUCKET_ELEMENTS:
                out.append(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel()
        out.append(bucket)
    return out


def main_process() -> bool:
    """Whether this is the process that speaks for a run: rank 0 of a launcher's, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Processes]:
    """This process's place in the run: under a launcher, the process group joined (NCCL when training on CUDA,
    else gloo) and left at the end (unless the caller had joined it already); one process otherwise."""
    if not launched():
        yield SINGLE
        return
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    joined = not dist.is_initialized()
    if joined:
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield Processes(rank, world, local)
    except BaseException:
        if joined:
            dist.destroy_process_group()
        raise
    if joined:
        _leave()


def _leave() -> None:
    """Leave the process group after a run that ended well: what still refers to it (sharded modules, their
    pending work) is freed first and every process waits for the others, so none tears down its connections
    while a peer still uses them; a process that exits holding gloo's work aborts ("terminate called without
    an active exception")."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
