"""Two gloo ranks with FSDP2 train only their trajectories with a nonzero advantage; one rank has
none (it runs a loss-free row for the collectives). The step equals the single-process step on
the whole batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict

from sidpt.batch import GROUP_ID, LOSS_MASK, REWARD, ROLLOUT_LOGPROBS, SEQ_LEN, TOKENS
from sidpt.model import build_model
from sidpt.model.model import ModelArgs
from sidpt.rl import apply_correction, compute_advantages
from sidpt.trainer import OptimConfig, Trainer, sequence_logprobs, signal_rows

ARGS = ModelArgs(vocab_size=53)
N, T = 8, 15


def make_batch() -> TensorDict:
    g = torch.Generator().manual_seed(3)
    seq_len = torch.randint(8, T + 1, (N,), generator=g)
    pos = torch.arange(T)[None, :]
    mask = (pos >= 3) & (pos < seq_len[:, None])
    batch = TensorDict({
        TOKENS: torch.randint(0, 53, (N, T), generator=g), SEQ_LEN: seq_len, LOSS_MASK: mask,
        GROUP_ID: torch.arange(N) // 4, REWARD: torch.tensor([1., 0., 0., 1., 1., 1., 1., 1.]),
    }, batch_size=[N])
    with torch.no_grad():
        lp, _ = sequence_logprobs(build_model(ARGS, seed=5), batch[TOKENS], mask=mask)
    batch[ROLLOUT_LOGPROBS] = torch.where(mask, lp + 0.3 * torch.randn(N, T, generator=g), 0.0)
    return compute_advantages(batch, "grpo")


def lean_step(trainer: Trainer, batch: TensorDict) -> dict[str, float]:
    """The controller's lean path: recompute and train the signal rows, normalise on all."""
    keep = signal_rows(batch, LOSS_MASK)
    part, _ = apply_correction(trainer.recompute(batch, rows=keep), "token-tis")
    return trainer.rl_step(part, agg="token-mean", loss="ppo", loss_kwargs={}, kl_coef=0.0, entropy_coef=0.0,
                           keep=keep)


def worker(rank, world, port, expect):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        trainer = Trainer(build_model(ARGS, seed=5), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1e9, 256), mesh=mesh)
        shard = make_batch()[rank * 4: (rank + 1) * 4]  # rank 1: one group with equal rewards, no signal
        assert bool(signal_rows(shard, LOSS_MASK).any()) == (rank == 0)
        stats = lean_step(trainer, shard)
        for k in ("loss/total", "train/grad_norm", "train/tokens", "train/seqs"):
            assert abs(stats[k] - expect[k]) <= 1e-5 * max(1.0, abs(expect[k])), (k, stats[k], expect[k])
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    except BaseException:
        dist.destroy_process_group()
        raise
    # Checked and passed. Leave without the interpreter's teardown: destroying the FSDP/gloo
    # threads there aborts now and then ("terminate called without an active exception").
    os._exit(0)


def test_lean_step_on_two_ranks_equals_single_process():
    full = make_batch()
    trainer = Trainer(build_model(ARGS, seed=5), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1e9, 256))
    part, _ = apply_correction(trainer.recompute(full), "token-tis")
    expect = trainer.rl_step(part, agg="token-mean", loss="ppo", loss_kwargs={}, kl_coef=0.0, entropy_coef=0.0)
    assert expect["train/grad_norm"] > 1e-3 and expect["train/seqs"] == N  # every row, the plain way
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    expect["train/seqs"] = 4.0  # the lean step trains only group 0
    mp.spawn(worker, args=(2, port, expect), nprocs=2, join=True)
