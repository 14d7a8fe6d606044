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

**Weights, main trainer -> rollout** (``publish_version`` / ``WeightReceiver``, on ``weight_group``):
a version header (int64 [1]; -1: the run is over) broadcast from the main trainer rank, then the
buckets of ``broadcast_weights``. A rollout rank's thread receives them into a shadow copy of the
engine's weights and waits until the main thread has copied them into the engine (``poll``,
between decode steps), so the next publish never overwrites weights still being copied.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Iterable

import torch
import torch.distributed as dist

from sidpt.batch import Trajectory
from sidpt.dist.transfer import broadcast_weights, receive_weights

TRAJECTORY, END = 1, 2
STOP = -1  # the version header that ends the run


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
    """Rollout side: a thread receives each published version into a shadow copy of the weights;
    ``poll`` hands the newest to the main thread (between decode steps)."""

    def __init__(self, model: torch.nn.Module, bucket_mb: float, src: int, group):
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.bucket_mb, self.src, self.group = bucket_mb, src, group
        self.ready, self.consumed = threading.Event(), threading.Event()
        self.version: int | None = None
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
                    for bucket in receive_weights(self.shadow, self.bucket_mb, self.src, self.group):
                        for name, t in bucket.items():
                            if t.data_ptr() != self.shadow[name].data_ptr():
                                self.shadow[name].copy_(t)
                self.version = version
                self.consumed.clear()
                self.ready.set()
                if version == STOP:
                    return
                self.consumed.wait()
        except BaseException as e:
            self.error = e
            self.ready.set()

    def poll(self, timeout: float | None = 0.0) -> int | None:
        """The version waiting to be taken (after up to ``timeout`` seconds; None: wait forever), or
        None. The caller copies ``shadow`` into its engine, then calls ``taken``."""
        if not self.ready.wait(timeout):
            return None
        if self.error is not None:
            raise RuntimeError("the weight stream failed") from self.error
        return self.version

    def taken(self) -> None:
        self.ready.clear()
        self.consumed.set()
