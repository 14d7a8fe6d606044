"""The world this process runs in: one process, or one rank of a torchrun job.

Reads torchrun's variables with single-process defaults; creates the default process group only
when the world has more than one rank (gloo on CPU, NCCL for CUDA tensors when GPUs exist).
"""

from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world() -> World:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                store=attempt_store(rank, world_size))
    return World(rank, world_size, local_rank, device)


def attempt_store(rank: int, world_size: int):
    """Under torchrun, its store seen under a prefix of this attempt (None otherwise: env://).
    The store torchrun's agent hosts outlives a restart (``--max-restarts``), so the restarted
    ranks found the failed attempt's gloo addresses there and connected to dead ports
    ("connectFullMesh failed ... Connection refused": 3 ranks on this CPU, 2 of 2 tries)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_PORT" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it, as env:// does
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "localhost"), int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent and rank == 0, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"sidpt/attempt_{attempt}", store)


def barrier(group=None) -> None:
    """A barrier on ``group`` (default: the world, for start-up file writes); no-op in one process."""
    if dist.is_initialized():
        dist.barrier(group=group)


def world_group():
    """The group of every rank (``None`` in one process, where collectives are the identity)."""
    return dist.group.WORLD if dist.is_initialized() else None


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device, group) -> list[float]:
    """Sum a few scalars over the ranks of ``group`` (a role's mesh group or a bridge group; pass
    it explicitly, ``None`` only in one process: the identity)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def gather_to_main(items: list, world: "World", group) -> list:
    """Every ``group`` rank's ``items`` (picklable; logs and examples, not the hot path),
    concatenated in rank order on the main rank (global rank 0, a member of ``group``); [] on the
    others; ``items`` itself in a single process."""
    if not dist.is_initialized():
        return list(items)
    out = [None] * dist.get_world_size(group) if world.is_main else None
    dist.gather_object(list(items), out, dst=0, group=group)
    return [x for part in out for x in part] if world.is_main else []


def all_reduce_max(values: list[float], device: torch.device, group) -> list[float]:
    """Elementwise max of a few scalars over the ranks of ``group`` (identity in one process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()
