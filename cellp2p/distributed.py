"""Several processes, one run: the process group under torchrun, ranks, seeds and sharding.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU and sets
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each one's
environment. With ``WORLD_SIZE`` > 1, :func:`setup` joins the processes into a group (NCCL on
CUDA, each process on ``cuda:LOCAL_RANK``; gloo on the CPU) and the training loop wraps the
trained networks in DistributedDataParallel. A single process (no torchrun, or
``--nproc_per_node 1``) never touches ``torch.distributed``: its :class:`World` has size 1 and
every collective below is a no-op.

Control traffic (flags, barriers, averaged losses, the final record) goes through a separate
gloo group on the CPU, so it never waits on the GPU stream and it tolerates rank 0 spending
a long time validating and checkpointing while the others wait.

A process joins the group once and keeps it until it exits (or :func:`shutdown`): several
runs in one process (``cellp2p ablate``, a notebook) reuse it. Destroying and re-creating the
group would not work under torchrun, whose rendezvous store outlives the group and still holds
the first group's addresses.
"""

from __future__ import annotations

import atexit
import inspect
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from cellp2p.errors import CellP2PError
from cellp2p.runtime import select_device

# Rank 0 may validate on many whole slices and write checkpoints while the others wait.
CONTROL_TIMEOUT = timedelta(minutes=60)


def env_world_size() -> int:
    """Processes in the run, as torchrun announces it (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """This process's rank, as torchrun announces it (0 without torchrun)."""
    return _env_int("RANK", 0)


def env_local_rank() -> int:
    """This process's rank on its node (which GPU it takes), 0 without torchrun."""
    return _env_int("LOCAL_RANK", 0)


def _env_int(name: str, default: int) -> int:
    """An integer environment variable, ``default`` when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise CellP2PError(f"environment variable {name}={value!r} is not an integer") from None


def _initialized() -> bool:
    """Whether a torch.distributed process group is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Size of the process group if one is running, else what the environment announces."""
    return torch.distributed.get_world_size() if _initialized() else env_world_size()


def rank() -> int:
    """This process's rank in the running group, else what the environment announces."""
    return torch.distributed.get_rank() if _initialized() else env_rank()


def is_main() -> bool:
    """True in the process that logs and writes (rank 0), and in a single process."""
    return rank() == 0


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Torch seed for one step of one rank (dropout masks, WGAN-GP interpolates).

    Rank 0 gets the single-process seed, so a one-process run is unchanged; other ranks are
    offset by ``rank · 2**40``, far beyond any step count, so no two (step, rank) collide.
    """
    return seed * 1_000_003 + step + rank * (1 << 40)


def shard_bounds(batch_size: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(global batch, first, end) of this rank's items: rank r takes r·b … (r+1)·b − 1."""
    return batch_size * world_size, rank * batch_size, (rank + 1) * batch_size


@dataclass
class World:
    """This process's place in the run; size 1 means a plain single process."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    control: Any = None  # a gloo group for flags and barriers
    owns_group: bool = False  # the default group was created here, so shutdown destroys it

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that validates and writes."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process is here (on the control group)."""
        if self.size > 1:
            torch.distributed.barrier(group=self.control)

    def agree(self, ok: bool, what: str = "set-up") -> None:
        """Raise in every process unless every process is ``ok``: a barrier that carries failure.

        The failing process raises its own error (the caller re-raises it); the others raise
        this one, rather than waiting forever for it in a collective.
        """
        if self.size <= 1:
            return
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.control)
        if ok and not int(flag):
            raise CellP2PError(
                f"another training process (of {self.size}) failed during {what}; "
                "its error is printed above"
            )

    def any(self, flag: bool) -> bool:
        """True in every process if it is true in one (e.g. an interrupt seen by one rank)."""
        if self.size <= 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.control)
        return bool(int(t))

    def first_error(self, message: str | None) -> str | None:
        """The first (by rank) of the processes' error messages, in every process; None when
        none has one. Each process passes its own (None: fine), so all can stop with one line."""
        if self.size <= 1:
            return message
        box: list[str | None] = [None] * self.size
        torch.distributed.all_gather_object(box, message, group=self.control)
        return next((m for m in box if m), None)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over processes of each value (every process passes the same keys)."""
        if self.size <= 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t, group=self.control)
        return {k: float(v) / self.size for k, v in zip(keys, t.tolist(), strict=True)}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` in every process (picklable objects only)."""
        if self.size <= 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def wrap(self, net: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``net`` (``net`` itself in a single process).

        Buffers (BatchNorm running statistics) are synchronised once at construction and then
        kept per process: in training mode BatchNorm normalises with the batch statistics, so
        the running ones never touch the gradients; rank 0's are saved and validated with
        (with --sync-bn they are the same in every process).
        """
        if self.size <= 1:
            return net
        from torch.nn.parallel import DistributedDataParallel as DDP

        params = inspect.signature(DDP.__init__).parameters
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in params
            else {"broadcast_buffers": False}
        )
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(net, device_ids=ids, output_device=ids[0] if ids else None, **no_sync)

    def shard(self, items: list) -> list:
        """This process's share of ``items``: rank r takes r, r+W, r+2W, …

        Waits first until every process is here, so none writes an output that another is
        still checking; a process that failed its checks exits, and torchrun stops the others.
        """
        if self.size <= 1:
            return list(items)
        self.barrier()
        return list(items)[self.rank :: self.size]


_WORLD: World | None = None


def _device(name: str, local_rank: int, size: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for auto/cuda when CUDA is there, else the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:"):
        raise CellP2PError(
            f"--device {name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
            "use --device cuda (or auto)"
        )
    if name == "mps":
        raise CellP2PError(
            "--device mps: multi-process training needs CUDA GPUs or the CPU; "
            "use --device cpu, or train in one process"
        )
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    select_device(name)  # an unknown name, or cuda without a GPU: the usual message
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise CellP2PError(
            f"this node runs process LOCAL_RANK={local_rank} but sees only {count} GPU(s); "
            f"use torchrun --nproc_per_node {count} (or fewer)"
        )
    return torch.device("cuda", local_rank)


def setup(device_name: str = "auto") -> World:
    """This process's :class:`World`; joins the torchrun process group when there is one.

    With ``WORLD_SIZE`` > 1 it initialises the default group from the environment
    (``init_method="env://"``: NCCL for CUDA devices, gloo for the CPU) or uses one already
    initialised, adds a gloo control group, and keeps both for later calls until the process
    exits. A single process gets a size-1 World and torch.distributed is never touched.
    """
    global _WORLD
    already = _initialized()
    size = torch.distributed.get_world_size() if already else env_world_size()
    if size <= 1:
        return World(device=select_device(device_name))
    if _WORLD is not None and already:
        device = _device(device_name, _WORLD.local_rank, size)
        if device != _WORLD.device:
            raise CellP2PError(
                f"--device {device_name}: this process already joined the run's process group "
                f"on {_WORLD.device}; use that device"
            )
        return _WORLD
    if not torch.distributed.is_available():
        raise CellP2PError(
            f"WORLD_SIZE={size}, but this torch has no torch.distributed; run one process"
        )
    local_rank = env_local_rank()
    device = _device(device_name, local_rank, size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not already:
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    else:
        backend = str(torch.distributed.get_backend())
    world = World(
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        size=torch.distributed.get_world_size(),
        device=device,
        backend=backend,
        owns_group=not already,
    )
    world.control = torch.distributed.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _WORLD = world
    atexit.register(shutdown)
    return world


def shutdown() -> None:
    """Leave the process group joined by :func:`setup` (at exit; a later setup cannot rejoin)."""
    global _WORLD
    world, _WORLD = _WORLD, None
    if world is None or not _initialized():
        return
    if world.control is not None:
        torch.distributed.destroy_process_group(world.control)
    if world.owns_group:
        torch.distributed.destroy_process_group()
