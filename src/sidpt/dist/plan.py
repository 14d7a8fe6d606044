"""The Plan: which global ranks do which role, on which named mesh, built identically on every rank.

Roles: rollout (engine + environment: generation, tool calls, rewards), trainer (FSDP2 policy),
reference (the frozen policy of the KL term). Like torchtitan's ParallelDims, the degrees are
validated against the world size up front and each rank asks the Plan what it does
(``rollout_enabled``, ``trainer_dp_rank``, ...), never computes rank arithmetic itself.

- ``colocated``: every role on every rank, phases alternate; one mesh serves rollout and trainer.
  Each rank trains the groups it generated, so no batch crosses ranks; weights are a local copy.
- ``disaggregated``: ranks ``[0, R)`` roll out (``run.rollout_ranks = R``), the next ones train;
  with ``run.reference_ranks = K`` the last K ranks hold the reference, else the trainer does.
  Two explicit bridge groups connect the meshes: ``bridge`` (rollout + trainer ranks: trajectory
  groups move rollout -> trainer, metrics reach the main rank) and ``weight_group`` (trainer
  rank 0 + the rollout ranks: the weight broadcast); ``ref_group`` (trainer + reference ranks)
  when the reference has its own ranks.

Meshes are 1-D with the named axis ``dp``; the reference needs none (each reference rank holds a
whole replicated copy and talks to trainer ranks over ``ref_group`` only). A single process gets no meshes and no groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from sidpt.dist.world import World
from sidpt.errors import ConfigError

PLACEMENTS = ("colocated", "disaggregated")


@dataclass
class Plan:
    placement: str
    rank: int
    rollout_ranks: list[int]
    trainer_ranks: list[int]
    reference_ranks: list[int]  # == trainer_ranks unless the reference has its own ranks
    rollout_mesh: DeviceMesh | None = None
    trainer_mesh: DeviceMesh | None = None
    bridge: object = None  # process group: rollout + trainer ranks (disaggregated)
    weight_group: object = None  # process group: trainer rank 0 + rollout ranks (disaggregated)
    ref_group: object = None  # process group: trainer + reference ranks (reference on its own ranks)
    stream_groups: list | None = None  # per rollout rank: a process group of it and trainer rank 0 (async stream)

    @property
    def disaggregated(self) -> bool:
        return self.placement == "disaggregated"

    @property
    def rollout_enabled(self) -> bool:
        return self.rank in self.rollout_ranks

    @property
    def trainer_enabled(self) -> bool:
        return self.rank in self.trainer_ranks

    @property
    def own_reference(self) -> bool:
        """The reference lives on ranks of its own (not on the trainer mesh)."""
        return self.reference_ranks != self.trainer_ranks

    @property
    def reference_enabled(self) -> bool:
        return self.rank in self.reference_ranks

    @property
    def rollout_dp(self) -> tuple[int, int]:
        """(this rank's index on the rollout mesh, the mesh size); index -1 off the mesh."""
        return _index(self.rank, self.rollout_ranks), len(self.rollout_ranks)

    @property
    def trainer_dp(self) -> tuple[int, int]:
        return _index(self.rank, self.trainer_ranks), len(self.trainer_ranks)

    @property
    def main_trainer(self) -> int:
        """The trainer rank that sends weights to the rollout ranks and metrics to the main rank."""
        return self.trainer_ranks[0]

    def group_of(self, mesh: DeviceMesh | None):
        return None if mesh is None else mesh.get_group("dp")


def _index(rank: int, ranks: list[int]) -> int:
    return ranks.index(rank) if rank in ranks else -1


def build_plan(world: World, placement: str = "colocated", rollout_ranks: int = 0,
               reference_ranks: int = 0) -> Plan:
    """Validate the degrees against the world size and build the role meshes and bridge groups
    (collective: every rank builds every mesh and group, in the same order)."""
    n = world.world_size
    if placement not in PLACEMENTS:
        raise ConfigError(f"run.placement={placement!r}: expected one of {PLACEMENTS}")
    if placement == "colocated":
        if rollout_ranks not in (0, n) or reference_ranks:
            raise ConfigError(f"run.rollout_ranks={rollout_ranks}, run.reference_ranks={reference_ranks}: "
                              f"colocated placement puts every role on all {n} ranks (leave both 0)")
        roll = train = ref = list(range(n))
    else:
        if not 0 < rollout_ranks < n - reference_ranks:
            raise ConfigError(f"run.rollout_ranks={rollout_ranks}, run.reference_ranks={reference_ranks}: "
                              f"disaggregated placement needs >= 1 rollout rank and >= 1 trainer rank, "
                              f"and the world has {n} (launch with more, e.g. NGPU={rollout_ranks + reference_ranks + 1})")
        roll = list(range(rollout_ranks))
        train = list(range(rollout_ranks, n - reference_ranks))
        ref = list(range(n - reference_ranks, n)) if reference_ranks else train
    plan = Plan(placement, world.rank, roll, train, ref)
    if not world.distributed:
        return plan

    def mesh(ranks: list[int]) -> DeviceMesh:
        return DeviceMesh(world.device.type, torch.tensor(ranks), mesh_dim_names=("dp",))

    if placement == "colocated":
        plan.rollout_mesh = plan.trainer_mesh = mesh(roll)
        return plan
    # DeviceMesh over a subset of ranks is built by every rank (it creates the group collectively)
    plan.rollout_mesh, plan.trainer_mesh = mesh(roll), mesh(train)
    plan.bridge = dist.new_group(roll + train)
    plan.weight_group = dist.new_group([train[0]] + roll)
    # the async pipeline's trajectory streams: one receiver thread per rollout rank, each on a group of its own
    plan.stream_groups = [dist.new_group([train[0], k]) for k in roll]
    if reference_ranks:
        plan.ref_group = dist.new_group(train + ref)
    return plan
