"""Data parallelism over ``torch.distributed``, in one place for every trainer (models: `interplab.train.trainer`,
SAEs: `interplab.sae.train`).

Under ``torchrun --nproc_per_node N`` each process trains on its share of the same global batch: the
process group is joined by `init_distributed` (gloo on CPU, nccl on GPU), rank 0 writes the run folder, and
gradients are averaged across ranks. In one process every helper is a no-op (or returns its input), so
callers never branch on whether they run distributed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    # Imported before any process group exists, on purpose: this module's functions take ``group=group.WORLD``
    # as a default argument, evaluated at import. torch imports it lazily (the first optimizer imports
    # torch._dynamo, which imports FSDP, which imports it), so under torchrun it was imported after
    # init_process_group and its defaults held the live group past destroy_process_group; the group was then
    # torn down at interpreter exit, where gloo sometimes aborts ("terminate called without an active
    # exception", SIGABRT): a rank that had finished its work failed the run.
    import torch.distributed.nn.functional  # noqa: F401


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group."""

    rank: int = 0
    world: int = 1
    started: bool = False
    """whether `init_distributed` started the group (then `shutdown` ends it)"""

    @property
    def main(self) -> bool:
        """rank 0: the process that writes the run folder and reports progress"""
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), unless one is already running."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), started=started)


def shutdown(info: DistInfo) -> None:
    """End the process group if `init_distributed` started it."""
    if info.started:
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the running group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """Whether this process is rank 0 (always, without a group)."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def from_rank0(value: int) -> int:
    """``value`` as rank 0 has it (a collective: every rank calls it); ``value`` itself in one process."""
    if world_size() == 1:
        return value
    t = torch.tensor([value])
    dist.broadcast(t, src=0)
    return int(t)


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. every rank starts from rank 0's weights)."""
    if world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=src)


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over ranks, in place (returned for chaining)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """``t`` averaged over ranks, in place (returned for chaining)."""
    world = world_size()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks with one collective (flattened into one buffer)."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
