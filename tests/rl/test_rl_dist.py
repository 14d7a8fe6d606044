"""all_reduce_norm over real gloo processes: the data-parallel step equals the full-batch step."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict

from sidpt.batch import ADVANTAGES, LOSS_MASK, OLD_LOGPROBS, ROLLOUT_LOGPROBS
from sidpt.rl.correction import apply_correction
from sidpt.rl.losses import AGG_MODES, TRAIN_MASK, all_reduce_norm, loss_norm, micro_batch_loss

F64 = torch.float64
N, T = 7, 6


def make_batch():
    g = torch.Generator().manual_seed(11)
    lens = torch.tensor([6, 2, 5, 1, 4, 6, 3])
    mask = (torch.arange(T)[None] < lens[:, None]) & (torch.arange(T)[None] >= 1)
    mask[3, 0] = True
    old = -torch.rand(N, T, generator=g, dtype=F64) * 3
    lp = (old + 0.1 * torch.randn(N, T, generator=g, dtype=F64)).requires_grad_(True)
    batch = TensorDict(
        {
            LOSS_MASK: mask,
            OLD_LOGPROBS: old,
            ROLLOUT_LOGPROBS: old + 0.4 * torch.randn(N, T, generator=g, dtype=F64),
            ADVANTAGES: torch.where(mask, torch.randn(N, T, generator=g, dtype=F64), 0.0),
        },
        batch_size=[N],
    )
    batch, _ = apply_correction(batch, "icepop", lo=0.6, hi=1.5)
    return batch, lp


def check_step(rank, world, group):
    """The group's ranks split the batch; their summed step must equal the full-batch step."""
    batch, lp = make_batch()
    rows = torch.arange(N).tensor_split(world)[rank]  # uneven shards
    for mode in AGG_MODES:
        full_norm = loss_norm(batch[TRAIN_MASK], mode, norm_len=5.0)
        full, _ = micro_batch_loss(lp, batch, full_norm, loss="ppo")
        (g_full,) = torch.autograd.grad(full, lp)

        local = batch[rows]
        norm = all_reduce_norm(loss_norm(local[TRAIN_MASK], mode, norm_len=5.0), group=group)
        assert (norm.num_tokens, norm.num_seqs) == (full_norm.num_tokens, full_norm.num_seqs)
        grad = torch.zeros_like(lp)
        total = torch.zeros((), dtype=F64)
        for mb in rows.split(2):  # micro-batches of 2 trajectories
            x = lp.detach()[mb].requires_grad_(True)
            loss, _ = micro_batch_loss(x, batch[mb], norm, loss="ppo")
            loss.backward()
            grad[mb] += x.grad
            total += loss.detach()
        dist.all_reduce(total, group=group)  # what a summing DP gradient reduction does
        dist.all_reduce(grad, group=group)
        torch.testing.assert_close(total, full.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, g_full, rtol=0, atol=1e-12)


def worker(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check_step(rank, world, None)  # world size 4
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        check_step(rank % 2, 2, pairs[rank // 2])  # world size 2, twice side by side
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_step_equals_full_batch():
    """World size 4, and two process groups of 2 inside it (one spawn: imports dominate the cost);
    world size 1 is the single-process full batch itself."""
    mp.spawn(worker, args=(4, free_port()), nprocs=4, join=True)


def test_all_reduce_norm_is_identity_without_dist():
    n = loss_norm(torch.tensor([[True, False], [True, True]]), "token-mean")
    assert all_reduce_norm(n) == n and (n.num_tokens, n.num_seqs) == (3.0, 2.0)
