"""What crosses the role meshes in disaggregated placement: trajectory batches and weights.

**Trajectory groups, rollout -> trainer** (``send_groups`` / ``recv_groups``, point-to-point on
the Plan's ``bridge`` group). Trainer dp rank ``t`` of ``D`` trains the groups ``g`` with
``g % D == t`` (a deterministic rule every rank knows), so each rollout rank sends each trainer
rank exactly the rows it trains. The wire format is fixed, no pickled object on the way:

    header   int64 [2]       N rows, T tokens (N may be 0: the trainer still learns it has none)
    then, in WIRE order, each tensor as it is in ``sidpt.batch`` (bool travels as uint8):
    tokens [N, T] int64, loss_mask [N, T] bool, rollout_logprobs [N, T] float32,
    policy_version [N, T] int32, seq_len [N] int64, prompt_len [N] int64, group_id [N] int64,
    reward [N] float32, finish_reason [N] int8

A trainer rank concatenates what it receives in rollout-rank order (right-padding to the
longest T) and orders rows by (group, arrival), so the batch does not depend on timing.

**Weights, trainer -> rollout** (``broadcast_weights`` / ``receive_weights``, a broadcast from the
main trainer rank over ``weight_group``). The trainer's FSDP2 DTensor shards are all-gathered on
the trainer mesh bucket by bucket (``Trainer.full_weights``); each bucket is flattened into one
contiguous buffer per dtype and broadcast in one call. Receivers know the layout without a header:
``bucket_names`` splits the parameter list by the same rule on both sides (same model, same
``train.publish_bucket_mb``). Never through disk.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from tensordict import TensorDict

from sidpt.batch import (
    FINISH_REASON, GROUP_ID, LOSS_MASK, POLICY_VERSION, PROMPT_LEN, REWARD, ROLLOUT_LOGPROBS, SEQ_LEN, TOKENS,
)

# (key, dtype, per-token) in wire order
WIRE = ((TOKENS, torch.int64, True), (LOSS_MASK, torch.bool, True), (ROLLOUT_LOGPROBS, torch.float32, True),
        (POLICY_VERSION, torch.int32, True), (SEQ_LEN, torch.int64, False), (PROMPT_LEN, torch.int64, False),
        (GROUP_ID, torch.int64, False), (REWARD, torch.float32, False), (FINISH_REASON, torch.int8, False))


def _wire(t: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous()


def send_groups(batch: TensorDict, trainer_ranks: list[int], group) -> None:
    """Rollout side: the rows of ``batch`` that trainer dp rank t trains (``group_id % D == t``) to
    global rank ``trainer_ranks[t]``, for every t (an empty header where it trains none of them)."""
    D = len(trainer_ranks)
    works = []
    for t, dst in enumerate(trainer_ranks):
        works += send_rows(batch[batch[GROUP_ID] % D == t], dst, group)
    for w in works:
        w.wait()


def send_rows(part: TensorDict, dst: int, group) -> list:
    """Post the sends of one row set (header, then the WIRE tensors) to global rank ``dst``; returns
    the works (their tensors stay referenced by them until they complete)."""
    N, T = part.batch_size[0], part[TOKENS].shape[1] if part.batch_size[0] else 0
    msgs = [torch.tensor([N, T], dtype=torch.int64)]
    if N:
        msgs += [_wire(part[key].to(dtype)) for key, dtype, _ in WIRE]
    return [dist.isend(m, dst=dst, group=group, tag=i) for i, m in enumerate(msgs)]


def recv_groups(rollout_ranks: list[int], group) -> TensorDict:
    """Trainer side: every rollout rank's rows for this trainer rank, as one right-padded batch
    ordered by (group, arrival order); N = 0 when no group falls to this rank."""
    return join_rows([p for p in (recv_rows(src, group) for src in rollout_ranks) if p is not None])


def recv_rows(src: int, group) -> dict[str, torch.Tensor] | None:
    """The row set ``send_rows`` posted from global rank ``src`` (None when it has no rows)."""
    header = torch.empty(2, dtype=torch.int64)
    dist.recv(header, src=src, group=group, tag=0)
    N, T = header.tolist()
    if not N:
        return None
    td = {}
    for i, (key, dtype, per_token) in enumerate(WIRE, start=1):
        wire_dtype = torch.uint8 if dtype == torch.bool else dtype
        buf = torch.empty((N, T) if per_token else (N,), dtype=wire_dtype)
        dist.recv(buf, src=src, group=group, tag=i)
        td[key] = buf.to(torch.bool) if dtype == torch.bool else buf
    return td


def join_rows(parts: list[dict[str, torch.Tensor]]) -> TensorDict:
    """Concatenate row sets (right-padding per-token tensors to the longest), stably ordered by group."""
    if not parts:
        return TensorDict({key: torch.zeros((0, 1) if per_token else (0,), dtype=dtype)
                           for key, dtype, per_token in WIRE}, batch_size=[0])
    T = max(p[TOKENS].shape[1] for p in parts)
    cols = {}
    for key, dtype, per_token in WIRE:
        pad = -1 if key == POLICY_VERSION else 0
        cols[key] = torch.cat([torch.nn.functional.pad(p[key], (0, T - p[key].shape[1]), value=pad)
                               if per_token else p[key] for p in parts])
    order = torch.sort(cols[GROUP_ID], stable=True).indices
    return TensorDict({k: v[order] for k, v in cols.items()}, batch_size=[len(order)])


def bucket_names(sizes: Iterable[tuple[str, int]], bucket_mb: float) -> list[list[str]]:
    """Parameter names grouped into buckets of about ``bucket_mb`` (a bucket closes once it holds
    at least that many bytes): the one rule of ``Trainer.full_weights`` and ``receive_weights``."""
    out, cur, size = [], [], 0
    for name, nbytes in sizes:
        cur.append(name)
        size += nbytes
        if size >= bucket_mb * 2**20:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


_STAGING: dict[tuple[torch.dtype, str], torch.Tensor] = {}


def _staging(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One reused flat buffer per (dtype, device), grown to the largest bucket: a fresh buffer per
    bucket was mapped anew by the allocator on every publish (glibc serves allocations above
    32 MiB with mmap), and faulting its pages in ran at 1.1-1.2 GB/s against 6.2 GB/s memcpy
    (tools/bench_publish.py, 2026-12-01: 64 MB buckets half the speed of 16 MB ones)."""
    key = (dtype, str(device))
    buf = _STAGING.get(key)
    if buf is None or buf.numel() < numel:
        buf = _STAGING[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return tensors[0].reshape(-1)
    out = _staging(sum(t.numel() for t in tensors), tensors[0].dtype, tensors[0].device)
    torch.cat([t.reshape(-1) for t in tensors], out=out)
    return out


def broadcast_weights(buckets: Iterable[dict[str, torch.Tensor]], src: int, group, send: bool) -> int:
    """Trainer side: iterate the full-weight buckets (collective on the trainer mesh: every trainer
    rank iterates) and, where ``send`` (the main trainer rank), broadcast each bucket from global
    rank ``src`` over ``group``, one flat buffer per dtype (a reused staging buffer; a bucket of
    one tensor goes as it is). Returns the bytes sent."""
    sent = 0
    for bucket in buckets:
        if not send:
            continue
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in bucket.values():
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype in sorted(by_dtype, key=str):
            flat = _flat(by_dtype[dtype])
            dist.broadcast(flat, src=src, group=group)
            sent += flat.numel() * flat.element_size()
    return sent


def receive_weights(model: torch.nn.Module | dict[str, torch.Tensor], bucket_mb: float, src: int, group,
                    in_place: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Rollout side: the buckets ``broadcast_weights`` sends, as {name: tensor} for
    ``Engine.update_weights``. A bucket's lone tensor of a dtype is received straight into its
    parameter (no copy); several go through one reused staging buffer, so each yielded bucket is
    valid until the next is asked for (``update_weights`` copies it first). ``in_place=False``
    never writes the parameters (to compare what arrives with what is there)."""
    params = dict(model) if isinstance(model, dict) else dict(model.named_parameters())
    for names in bucket_names(((n, p.numel() * p.element_size()) for n, p in params.items()), bucket_mb):
        by_dtype: dict[torch.dtype, list[str]] = {}
        for n in names:
            by_dtype.setdefault(params[n].dtype, []).append(n)
        bucket = {}
        for dtype in sorted(by_dtype, key=str):
            ns = by_dtype[dtype]
            if in_place and len(ns) == 1 and params[ns[0]].is_contiguous():
                with torch.no_grad():
                    dist.broadcast(params[ns[0]].data, src=src, group=group)
                bucket[ns[0]] = params[ns[0]].data
                continue
            flat = _staging(sum(params[n].numel() for n in ns), dtype, params[ns[0]].device)
            dist.broadcast(flat, src=src, group=group)
            for n, piece in zip(ns, flat.split([params[n].numel() for n in ns])):
                bucket[n] = piece.view(params[n].shape)
        yield bucket


# -- the reference on ranks of its own: trainer dp rank t asks reference rank t % K ---------------

REF_WIRE = ((TOKENS, torch.int64), (LOSS_MASK, torch.bool), (SEQ_LEN, torch.int64))


def request_ref_logprobs(batch: TensorDict, dst: int, group, dtype: torch.dtype) -> torch.Tensor:
    """Trainer side: send tokens, loss_mask and seq_len of ``batch`` to reference rank ``dst``;
    receive its log-probs [N, T] (``dtype``: the model's compute dtype)."""
    N, T = batch[TOKENS].shape
    dist.send(torch.tensor([N, T], dtype=torch.int64), dst=dst, group=group, tag=100)
    for i, (key, _) in enumerate(REF_WIRE, start=101):
        dist.send(_wire(batch[key]), dst=dst, group=group, tag=i)
    out = torch.empty(N, T, dtype=dtype)
    dist.recv(out, src=dst, group=group, tag=110)
    return out


def serve_ref_logprobs(logprobs, srcs: list[int], group) -> None:
    """Reference side: for each trainer rank in ``srcs`` (in order), receive its batch and send back
    ``logprobs(td)`` ([N, T], the reference's log-probs of the loss tokens)."""
    for src in srcs:
        header = torch.empty(2, dtype=torch.int64)
        dist.recv(header, src=src, group=group, tag=100)
        N, T = header.tolist()
        td = {}
        for i, (key, dtype) in enumerate(REF_WIRE, start=101):
            buf = torch.empty((N, T) if key != SEQ_LEN else (N,), dtype=torch.uint8 if dtype == torch.bool else dtype)
            dist.recv(buf, src=src, group=group, tag=i)
            td[key] = buf.to(torch.bool) if dtype == torch.bool else buf
        dist.send(logprobs(TensorDict(td, batch_size=[N])).contiguous(), dst=src, group=group, tag=110)
