"""Data parallelism over ``torch.distributed``, in one place for every trainer (models: `interplab.train.trainer`,
SAEs: `interplab.sae.train`).

Under ``torchrun --nproc_per_node N`` each process trains on its share of the same global batch: the
process group is joined by `init_distributed` (gloo on CPU, nccl on GPU), rank 0 writes the run folder, and
gradients are averaged across ranks. In one process every helper is a no-op (or returns its input), so
callers never branch on whether they run distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
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


#: seconds a collective waits for the other ranks before the job stops with an error naming the missing rank
#: (``INTERPLAB_DIST_TIMEOUT``; torch's own default is 30 minutes)
DEFAULT_TIMEOUT_S = 600.0


class RankFailure(RuntimeError):
    """Another rank of the process group died, hung or failed: this rank stops instead of waiting forever."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group."""

    rank: int = 0
    world: int = 1
    started: bool = False
    """whether `init_distributed` started the group (then `shutdown` ends it)"""
    local_rank: int = 0
    """the rank within this node (torchrun's ``LOCAL_RANK``): which GPU of the node this process uses"""

    @property
    def main(self) -> bool:
        """rank 0: the process that writes the run folder and reports progress"""
        return self.rank == 0


def timeout_s() -> float:
    """How long a collective waits for the other ranks (``INTERPLAB_DIST_TIMEOUT`` seconds, default 600)."""
    raw = os.environ.get("INTERPLAB_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"INTERPLAB_DIST_TIMEOUT={raw!r}: give a positive number of seconds (e.g. 600)")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{name}={raw!r} is not an integer (torchrun sets it; do not set it by hand)"
        ) from None


def env_info() -> DistInfo:
    """Rank, world size and local rank as torchrun describes them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
    checked; one process without them. Starts nothing."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 "
            "(launch with torchrun, which sets them)"
        )
    return DistInfo(rank=rank, world=world, local_rank=local)


def local_device(device: torch.device | str | None = None) -> torch.device:
    """The device this process computes on: ``cuda:LOCAL_RANK`` when ``device`` is CUDA (or None and CUDA is
    there) under torchrun, so the N processes of a node use its N GPUs; CPU otherwise."""
    dev = torch.device(device) if device is not None else None
    if dev is None:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type != "cuda" or dev.index is not None:
        return dev
    info = env_info()
    n = torch.cuda.device_count()
    if info.local_rank >= n:
        raise ValueError(
            f"LOCAL_RANK={info.local_rank} but this node has {n} GPU(s): use torchrun --nproc_per_node <= {n}"
        )
    return torch.device("cuda", info.local_rank)


def init_distributed(device: torch.device | str | None = None) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), unless one is already running.

    Multi-node: every node runs the same ``torchrun --nnodes N --node_rank I --rdzv_endpoint HOST:PORT ...``;
    ranks are global (``RANK``), the device is ``cuda:LOCAL_RANK`` (see `local_device`), the rendezvous comes
    from torchrun's environment (``MASTER_ADDR``/``MASTER_PORT``). Collectives time out after `timeout_s`
    (a rank that died stops the others instead of hanging them)."""
    info = env_info()
    if info.world <= 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(
            rank=dist.get_rank(), world=dist.get_world_size(), started=False, local_rank=info.local_rank
        )
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={info.world} but {', '.join(missing)} is not set: launch with torchrun "
            "(torchrun --nproc_per_node N -m interplab ...), which sets the rendezvous"
        )
    dev = local_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s())
    )
    return DistInfo(
        rank=dist.get_rank(), world=dist.get_world_size(), started=True, local_rank=info.local_rank
    )


def shutdown(info: DistInfo) -> None:
    """End the process group if `init_distributed` started it."""
    if info.started:
        dist.destroy_process_group()


_LOCAL = [0]  # depth of `single_process` blocks


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Inside, every helper here acts as in one process (world 1, rank "main"): a rank does work of its own
    (e.g. its share of a sweep, `interplab.sae.sweep`) with no collective."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def _active() -> bool:
    return not _LOCAL[0] and dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the running group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's global rank (0 without a group)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """Whether this process is rank 0 (always, without a group)."""
    return not _active() or dist.get_rank() == 0


def barrier(what: str = "a barrier") -> None:
    """Wait for every process (no-op in one process). On gloo a monitored barrier: a rank that does not arrive
    within `timeout_s` (dead or hung) is named in a `RankFailure` on rank 0 instead of a hang."""
    if world_size() == 1:
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s()), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as err:
        raise RankFailure(_failure(what, err)) from err


def _failure(what: str, err: BaseException) -> str:
    return (
        f"rank {rank()}: another rank did not reach {what} ({str(err).splitlines()[0][:300]}): it died, hung "
        f"or failed (see its error). The job stops; run the same command again to resume from the last "
        "checkpoint"
    )


def agree(error: BaseException | None, what: str) -> None:
    """A collective check that every rank passed ``what``: raises ``error`` on the rank that had it and a
    `RankFailure` naming the failing ranks on the others, so no rank goes on into a collective the failed
    one never joins (a hang). No-op in one process (``error`` is raised)."""
    if world_size() == 1:
        if error is not None:
            raise error
        return
    flags = torch.zeros(world_size(), dtype=torch.long)
    flags[rank()] = int(error is not None)
    try:
        dist.all_reduce(flags)
    except RuntimeError as err:
        raise RankFailure(_failure(what, err)) from err
    if error is not None:
        raise error
    bad = flags.nonzero().flatten().tolist()
    if bad:
        raise RankFailure(f"rank(s) {bad} failed {what} (see their error); this rank {rank()} stops too")


def same_on_every_rank(value: int, what: str) -> None:
    """Refuse (ValueError on every rank, listing each rank's value) unless ``value`` is the same on every rank."""
    if world_size() == 1:
        return
    values = torch.zeros(world_size(), dtype=torch.long)
    values[rank()] = value
    _all_reduce(values)
    if bool((values != values[0]).any()):
        raise ValueError(
            f"{what} differs across ranks ({values.tolist()}, by rank): every rank must have the same"
        )


def shard_of(n: int, rank: int, world: int) -> range:
    """The items of ``range(n)`` rank ``rank`` of ``world`` takes: every ``world``-th, from ``rank``
    (disjoint across ranks, covering every item exactly once)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}: need world >= 1 and 0 <= rank < world")
    return range(rank, n, world)


def from_rank0(value: int) -> int:
    """``value`` as rank 0 has it (a collective: every rank calls it); ``value`` itself in one process."""
    if world_size() == 1:
        return value
    t = torch.tensor([value])
    try:
        dist.broadcast(t, src=0)
    except RuntimeError as err:
        raise RankFailure(_failure("a broadcast from rank 0", err)) from err
    return int(t)


def broadcast_(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (e.g. every rank starts from rank 0's weights)."""
    if world_size() > 1:
        for t in tensors:
            dist.broadcast(t.data, src=src)


def _all_reduce(t: Tensor) -> None:
    """``dist.all_reduce``; a peer that died (gloo: connection closed; any backend: the timeout) is a
    `RankFailure` saying what to do."""
    try:
        dist.all_reduce(t)
    except RuntimeError as err:
        raise RankFailure(_failure("an all-reduce", err)) from err


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over ranks, in place (returned for chaining)."""
    if world_size() > 1:
        _all_reduce(t)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    """``t`` averaged over ranks, in place (returned for chaining)."""
    world = world_size()
    if world > 1:
        _all_reduce(t)
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
