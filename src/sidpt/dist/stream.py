"""The async pipeline's wires (``run.pipeline = "async"``): trajectories stream from the rollout
ranks to the main trainer rank while both work, and weights reach a rollout rank between its
decode steps. Gloo cannot poll a receive (``Work.is_completed`` stays False until ``wait``,
checked on torch 2.13), so each receiving side runs one thread that blocks in ``recv`` on a
process group of its own and hands what arrives to the main thread; the main threads never wait
on the other role except where the staleness bound says they must.

**Trajectories, rollout -> main trainer** (``TrajectorySender`` / ``TrajectoryReceiver``, on the
Plan's ``stream_groups``, one two-rank group per rollout rank): one message per finished
trajectory, posted with ``isend`` (the buffers live until the send completes), received by one
thread per rollout rank into one queue, in arrival order:

    header  int64 [6]         kind (1 trajectory, 2 end of stream), group, index, T, prompt_len, finish_reason
    ints    int64 [3, T]      tokens, loss_mask, policy_version (of the token's sampling weights, -1 if not sampled)
    floats  float32 [T + 1]   rollout log-probs, then the reward

**Which rollout rank runs which group** (``GroupClaims``): ``claim`` (default) takes the next
group index from a counter in torch.distributed's own rendezvous store (one atomic ``add`` per
group: control, not data), so a fast rank runs more groups and a slow one holds back only the
groups it took; ``static`` puts group ``i`` on rank ``(i % B) % R``, as the synchronous run does.

**Weights, main trainer -> rollout** (``publish_version`` / ``WeightReceiver``, on ``weight_group``):
a version header (int64 [1]; -1: the run is over) broadcast from the main trainer rank, then the
buckets of ``broadcast_weights``. A rollout rank's thread receives them into a back buffer and
swaps it with the front one; the main thread copies the newest front into the engine between
decode steps (``poll``, ``take``). The thread never waits for the main thread, so a slow rollout
rank cannot hold a publish back (it skips to the newest version); the cost is two copies of the
weights beside the engine's.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Iterable

import torch
import torch.distributed as dist

from sidpt.batch import Trajectory
from sidpt.dist.transfer import broadcast_weights, receive_weights

TRAJECTORY, END = 1, 2
STOP = -1  # the version header that ends the run


class GroupClaims:
    """The work units this rollout rank runs, in order (see the module docstring): pipeline
    groups in increasing order, after a resume first the samples the checkpoint lacked (``next``). In ``claim`` mode a rank also paces itself: it claims a group only while its
    trajectories' latency (from its group's start to its end: the p90 of the last 32, or the age of
    its oldest group still running if larger) is at most
    ``SLACK x (k + 1)`` trainer steps (the mean interval between the versions it receives, or the
    time since the last one if longer). A rank much slower than the trainer (a sick host, an
    injected delay) then stops taking groups, which it would finish only after the bound (dropped,
    or holding a never-discard schedule back), and the other ranks run them; when the trainer
    waits, the time since its last version grows and the rank claims again, so the pacing never
    deadlocks. Until one of its trajectories has ended, a rank runs one group at a time: a slow
    rank's first claims would otherwise hold a whole share of the admission window."""

    KEY = "sidpt/async/next_unit"
    SLACK = 4.0

    def __init__(self, mode: str, B: int, dp: int, R: int, k: int,
                 redo: list[tuple[int, tuple[int, ...]]] = (), first: int = 0, attempt: str = "0"):
        self.mode, self.B, self.dp, self.R, self.k, self.n = mode, B, dp, R, k, -1
        self.redo, self.first = list(redo), first  # a resumed pipeline's work (``PipelineState.missing``)
        self.store = dist.distributed_c10d._get_default_store() if mode == "claim" else None
        self.key = f"{self.KEY}/{attempt}"  # a fresh counter per start and restart (the store may outlive one)
        self.start: dict[int, float] = {}
        self.latencies: deque = deque(maxlen=32)
        self.period: float | None = None
        self.last_version = time.perf_counter()

    def next(self) -> tuple[int, tuple[int, ...] | None]:
        """The next work unit: (group, the samples to run; None: all of them). Units are the
        resumed pipeline's ``redo`` list, then every group from ``first``; ``claim``: the next
        unit over all ranks (the store's atomic counter), ``static``: the next of this rank's."""
        while True:
            if self.store is not None:
                self.n = self.store.add(self.key, 1) - 1  # atomic over the ranks: each unit to one rank
            else:
                self.n += 1
            g, idx = self.redo[self.n] if self.n < len(self.redo) else (self.first + self.n - len(self.redo), None)
            if self.store is not None or (g % self.B) % self.R == self.dp:
                return g, idx

    def started(self, i: int) -> None:
        self.start[i] = time.perf_counter()

    def finished(self, i: int, group_done: bool) -> None:
        if i in self.start:  # (several samples of a group can end in one engine step)
            self.latencies.append(time.perf_counter() - self.start[i])
        if group_done:
            self.start.pop(i, None)

    def version(self) -> None:
        now = time.perf_counter()
        gap, self.last_version = now - self.last_version, now
        self.period = gap if self.period is None else 0.7 * self.period + 0.3 * gap

    def may_claim(self) -> bool:
        if self.store is None:
            return True
        if not self.latencies:  # nothing measured yet: one group at a time until a trajectory ends
            return not self.start
        if self.period is None:
            return True
        now = time.perf_counter()
        p90 = sorted(self.latencies)[int(0.9 * (len(self.latencies) - 1))]
        lat = max(p90, max((now - t for t in self.start.values()), default=0.0))  # or the oldest still running
        return lat <= self.SLACK * (self.k + 1) * max(self.period, now - self.last_version)


class TrajectorySender:
    """Rollout side: post each finished trajectory to the main trainer without waiting."""

    def __init__(self, dst: int, group, keep: int = 256):
        self.dst, self.group, self.keep = dst, group, keep
        self.works: deque = deque()

    def send(self, t: Trajectory) -> None:
        T = len(t.tokens)
        header = torch.tensor([TRAJECTORY, t.group, t.index, T, t.prompt_len, t.finish_reason], dtype=torch.int64)
        ints = torch.tensor([t.tokens, [int(m) for m in t.loss_mask], t.versions], dtype=torch.int64)
        floats = torch.tensor([*t.logprobs, t.reward], dtype=torch.float32)
        for tag, m in enumerate((header, ints, floats)):
            self.works.append(dist.isend(m, dst=self.dst, group=self.group, tag=tag))
        while len(self.works) > self.keep:  # the receiver thread drains continuously: this seldom waits
            self.works.popleft().wait()

    def close(self) -> None:
        """End of stream: the receiver counts one END per rollout rank."""
        self.works.append(dist.isend(torch.tensor([END, 0, 0, 0, 0, 0], dtype=torch.int64), dst=self.dst,
                                     group=self.group, tag=0))
        while self.works:
            self.works.popleft().wait()


class TrajectoryReceiver:
    """Main trainer side: one thread per rollout rank receives its trajectories into ``queue``
    until that rank ends its stream."""

    def __init__(self, srcs: list[int], groups: list):
        self.queue: queue.Queue[Trajectory] = queue.Queue()
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._loop, args=(src, g), name=f"sidpt-trajectories-{src}",
                                         daemon=True) for src, g in zip(srcs, groups)]
        for t in self.threads:
            t.start()

    def _loop(self, src: int, group) -> None:
        try:
            while True:
                header = torch.empty(6, dtype=torch.int64)
                dist.recv(header, src=src, group=group, tag=0)
                kind, g, j, T, P, fin = header.tolist()
                if kind == END:
                    return
                ints, floats = torch.empty(3, T, dtype=torch.int64), torch.empty(T + 1, dtype=torch.float32)
                dist.recv(ints, src=src, group=group, tag=1)
                dist.recv(floats, src=src, group=group, tag=2)
                tok, mask, ver = ints.tolist()
                self.queue.put(Trajectory(g, j, tok, [bool(m) for m in mask], ver, floats[:T].tolist(), P, fin,
                                          float(floats[T])))
        except BaseException as e:  # surfaced by get() and join()
            self.error = e

    def get(self, timeout: float | None = None) -> Trajectory | None:
        """The next trajectory (blocking up to ``timeout``; None when none came)."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            if self.error is not None:
                raise RuntimeError("the trajectory stream failed") from self.error
            return None

    def drain(self) -> list[Trajectory]:
        out = []
        while True:
            try:
                out.append(self.queue.get_nowait())
            except queue.Empty:
                return out

    def join(self) -> int:
        """Wait for every END; returns how many trajectories arrived unused after the last step."""
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise RuntimeError("the trajectory stream failed") from self.error
        return len(self.drain())


def publish_version(buckets: Iterable[dict[str, torch.Tensor]], version: int, src: int, group, send: bool) -> None:
    """Trainer side (every trainer rank iterates ``buckets``: the FSDP all-gather is collective):
    the version header, then the weights, from the main trainer rank. ``version = STOP`` ends the
    run (no weights follow)."""
    if send:
        dist.broadcast(torch.tensor([version], dtype=torch.int64), src=src, group=group)
    if version != STOP:
        broadcast_weights(buckets, src, group, send=send)


class WeightReceiver:
    """Rollout side: a thread receives each published version into a back buffer and swaps it to
    the front; ``take`` copies the newest front into the engine between decode steps. The thread
    never waits for the main thread (only for the lock of a copy in progress), so a slow rollout
    rank never holds a publish back: it skips to the newest version instead."""

    def __init__(self, model: torch.nn.Module, bucket_mb: float, src: int, group):
        self.front = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.back = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.bucket_mb, self.src, self.group = bucket_mb, src, group
        self.lock, self.ready = threading.Lock(), threading.Event()
        self.front_version: int | None = None  # the version in ``front``
        self.taken: int | None = None  # the last version copied into the engine
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="sidpt-weights", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while True:
                header = torch.empty(1, dtype=torch.int64)
                dist.broadcast(header, src=self.src, group=self.group)
                version = int(header)
                if version != STOP:
                    for bucket in receive_weights(self.back, self.bucket_mb, self.src, self.group):
                        for name, t in bucket.items():
                            if t.data_ptr() != self.back[name].data_ptr():
                                self.back[name].copy_(t)
                with self.lock:
                    if version == STOP:
                        self.stopped = True
                    else:
                        self.front, self.back, self.front_version = self.back, self.front, version
                    self.ready.set()
                if version == STOP:
                    return
        except BaseException as e:
            self.error = e
            self.ready.set()

    def poll(self, timeout: float | None = 0.0) -> int | None:
        """The newest version not taken yet, STOP once every version was taken and the run is
        over, or None (after up to ``timeout`` seconds; None: wait for one of the two)."""
        if not self.ready.wait(timeout):
            return None
        if self.error is not None:
            raise RuntimeError("the weight stream failed") from self.error
        with self.lock:
            if self.front_version != self.taken:
                return self.front_version
            return STOP if self.stopped else None

    def take(self, engine) -> int:
        """Copy the newest version into ``engine`` (``update_weights``); returns it."""
        with self.lock:
            engine.update_weights([self.front], version=self.front_version)
            self.taken = self.front_version
            if not self.stopped:
                self.ready.clear()
            return self.taken
