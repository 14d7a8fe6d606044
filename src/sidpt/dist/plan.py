"""The Plan: which global ranks form which role mesh, built identically on every rank.

Roles: rollout (engine), trainer (FSDP2), reference (frozen policy for KL), reward (env).
``colocated``: every role on every rank, phases alternate. ``disaggregated``: the first
``rollout_ranks`` ranks generate, the rest train (and host reference and reward); the meshes are
disjoint. Meshes are 1-D with the named axis ``dp``. A single process gets no meshes at all
(no process groups when the world has one rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

from sidpt.dist.world import World

PLACEMENTS = ("colocated", "disaggregated")


@dataclass
class Plan:
    placement: str
    rollout_ranks: list[int]
    trainer_ranks: list[int]
    rollout_mesh: DeviceMesh | None
    trainer_mesh: DeviceMesh | None

    @property
    def reference_ranks(self) -> list[int]:
        return self.trainer_ranks

    @property
    def reward_ranks(self) -> list[int]:
        return self.trainer_ranks

    def is_rollout(self, rank: int) -> bool:
        return rank in self.rollout_ranks

    def is_trainer(self, rank: int) -> bool:
        return rank in self.trainer_ranks


def build_plan(world: World, placement: str = "colocated", rollout_ranks: int = 0) -> Plan:
    """Validate the degrees against the world size and build the role meshes (collective)."""
    n = world.world_size
    if placement not in PLACEMENTS:
        raise ValueError(f"run.placement={placement!r}: expected one of {PLACEMENTS}")
    if placement == "colocated":
        if rollout_ranks not in (0, n):
            raise ValueError(f"run.rollout_ranks={rollout_ranks}: colocated placement uses all {n} ranks (0)")
        roll = train = list(range(n))
    else:
        if not 0 < rollout_ranks < n:
            raise ValueError(f"run.rollout_ranks={rollout_ranks}: disaggregated placement needs "
                             f"1..{n - 1} rollout ranks out of world size {n}")
        roll, train = list(range(rollout_ranks)), list(range(rollout_ranks, n))
    if not world.distributed:
        return Plan(placement, roll, train, None, None)

    def mesh(ranks: list[int]) -> DeviceMesh:  # collective: every rank builds every mesh, in order
        return DeviceMesh(world.device.type, torch.tensor(ranks), mesh_dim_names=("dp",))

    if placement == "colocated":
        m = mesh(roll)
        return Plan(placement, roll, train, m, m)
    return Plan(placement, roll, train, mesh(roll), mesh(train))
