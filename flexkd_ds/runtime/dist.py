"""The process group: where a rank sits, collectives that are no-ops in a single process, and rank-0-first.

The ``deepspeed`` launcher, ``torchrun`` and our SLURM launcher set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_*; a plain ``python`` run is a world of one on a free local port.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import Tensor


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join (or, under a plain ``python`` start, create) the process group and pick this rank's device.

    The ``deepspeed`` launcher, ``torchrun`` and our SLURM script set RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT; without them this is a single-process job.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    # DeepSpeed's ZeRO-3 gathers call this torch collective, which torch 2.13 deprecates: one warning per rank
    # that no user can act on (DeepSpeed's to change)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)  # fmt: skip
    device = torch.device(
        accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"
    )
    if device.type == "cpu":
        atexit.register(_unlink_cpu_allreduce_buffer, dist.get_rank())
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cpu_allreduce_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU allreduce (its ``shm_comm`` op) creates for ``rank`` when all
    ranks share a node: ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """DeepSpeed never removes its 66 MB per-rank buffer: without this every CPU run, one-process runs
    included, leaves it in /dev/shm (RAM) until reboot. At exit every peer has long mapped it, and a mapping
    outlives the name."""
    with contextlib.suppress(OSError):
        cpu_allreduce_buffer(rank).unlink()


def shutdown() -> None:
    """Destroy the process group at the end of a job that finished on every rank (``expected_errors`` calls it
    on success only: after an error a peer may still be inside a collective, and tearing NCCL down then can
    hang). Left to interpreter exit, gloo's worker threads can be destroyed while still joinable: a 2-rank CPU
    job then sometimes ended with "terminate called without an active exception" and a non-zero exit code
    after it had written everything (seen once in CI, 2026-12-04)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def device_type() -> str:
    """'cuda', 'cpu', ... : the accelerator DeepSpeed runs on."""
    return get_accelerator().device_name()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (the ``all_reduce`` the losses take)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s python object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj) -> list:
    """Every rank's python object, in rank order (``[obj]`` outside a multi-rank group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    holder = [None] * dist.get_world_size()
    dist.all_gather_object(holder, obj)
    return holder


@contextlib.contextmanager
def main_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (downloads, dataset caches), then the others."""
    if not env.is_main:
        barrier()
    try:
        yield
    finally:
        if env.is_main:
            barrier()
