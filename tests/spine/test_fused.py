"""The fused step (pi_old from the training forward, no recompute) equals recompute + rl_step.

With one optimizer update per batch, pi_old = pi at the update, so ``Trainer.fused_step`` takes
OLD_LOGPROBS from the forward it trains on. Checked against the recompute path from the same
weights: the updated weights, the step's statistics and the mismatch diagnostics, in float64
(to 1e-12) and float32 (to float32 rounding), with a correction that only reweights, with ones
that reject tokens or whole trajectories (the normalisers change after the backward: the
gradients are rescaled), under every aggregation, with the lean step's ``keep``, and on two
gloo ranks with FSDP2 and packed forwards."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict

from sidpt.batch import (
    ADVANTAGES, GROUP_ID, LOSS_MASK, OLD_LOGPROBS, PROMPT_LEN, REWARD, ROLLOUT_LOGPROBS, SEQ_LEN, TOKENS,
)
from sidpt.model import build_model
from sidpt.model.model import ModelArgs
from sidpt.rl import REWEIGHT_ONLY, TRAIN_MASK, apply_correction, compute_advantages, mismatch_metrics
from sidpt.trainer import OptimConfig, Trainer, sequence_logprobs, signal_rows

ARGS = ModelArgs(vocab_size=47)
N, T = 12, 16
KW = dict(loss="ppo", loss_kwargs={"eps_low": 0.2, "eps_high": 0.28}, kl_coef=0.0, entropy_coef=0.0, norm_len=12.0)


def make_batch(dtype=torch.float64, flat_groups=(2,)) -> TensorDict:
    """Three groups of 4; the groups in ``flat_groups`` have equal rewards (zero advantage). The
    rollout log-probs are the model's own plus noise (a mismatch that MIS and IcePop act on)."""
    g = torch.Generator().manual_seed(7)
    seq_len = torch.randint(9, T + 1, (N,), generator=g)
    pos = torch.arange(T)[None, :]
    mask = (pos >= 3) & (pos < seq_len[:, None])
    reward = torch.tensor([1., 0., 1., 0., 0., 0., 1., 1., 0., 1., 0., 0.])
    for grp in flat_groups:
        reward[4 * grp: 4 * grp + 4] = 1.0
    batch = TensorDict({
        TOKENS: torch.randint(0, 47, (N, T), generator=g), SEQ_LEN: seq_len, LOSS_MASK: mask,
        GROUP_ID: torch.arange(N) // 4, REWARD: reward, PROMPT_LEN: torch.full((N,), 3),
    }, batch_size=[N])
    for i in range(N):  # a group's rows share their 3-token prompt (what packing computes once)
        batch[TOKENS][i, :3] = batch[TOKENS][4 * (i // 4), :3]
    with torch.no_grad():
        lp, _ = sequence_logprobs(build_model(ARGS, seed=3, dtype=dtype), batch[TOKENS], mask=mask)
    noise = 0.4 * torch.randn(N, T, generator=g, dtype=torch.float64)
    batch[ROLLOUT_LOGPROBS] = torch.where(mask, lp.double() + noise, 0.0).float()
    return compute_advantages(batch, "grpo")


def trainer(dtype=torch.float64, mb_tokens=40) -> Trainer:  # 40 tokens: several micro-batches per step
    return Trainer(build_model(ARGS, seed=3, dtype=dtype), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1e9, mb_tokens))


def recompute_path(t: Trainer, batch, mode, agg, keep=None, **bounds):
    part, corr = apply_correction(t.recompute(batch, rows=keep), mode, **bounds)
    return t.rl_step(part, agg=agg, keep=keep, **KW), part, corr


def fused_path(t: Trainer, batch, mode, agg, keep=None, **bounds):
    return t.fused_step(batch, lambda b: apply_correction(b, mode, **bounds), agg=agg, keep=keep, **KW)


@torch.no_grad()
def max_diff(a: Trainer, b: Trainer) -> float:
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    return max(float((pa[n] - pb[n]).abs().max()) for n in pa)


@pytest.mark.parametrize("mode,agg,bounds", [
    ("none", "token-mean", {}), ("token-tis", "seq-mean-token-mean", {}), ("token-mis", "token-mean", {}),
    ("icepop", "seq-mean-token-mean", {}), ("seq-mis", "seq-mean-token-sum", {}),
    ("seq-tis", "seq-mean-token-sum-norm", {}), ("k3-rs", "token-mean", {"k3_max": 0.08}),
])
def test_fused_step_equals_recompute_step_float64(mode, agg, bounds):
    batch = make_batch(flat_groups=())
    a, b, start = trainer(), trainer(), trainer()
    sa, part, corr_a = recompute_path(a, batch, mode, agg, **bounds)
    sb, fused, corr_b = fused_path(b, batch, mode, agg, **bounds)
    assert max_diff(a, start) > 1e-4  # the update did something
    assert max_diff(a, b) <= 1e-10  # Adam: gradients near its eps (1e-8) amplify rounding ~100x
    m = batch[LOSS_MASK]
    assert float((part[OLD_LOGPROBS] - fused[OLD_LOGPROBS])[m].abs().max()) <= 1e-12
    assert torch.equal(corr_a.mask, corr_b.mask)
    if mode not in REWEIGHT_ONLY:
        assert bool((corr_b.mask != m).any())  # this correction rejected something: the rescale ran
    for k in ("loss/total", "loss/policy", "loss/clip_frac", "train/grad_norm", "train/tokens", "train/seqs",
              "train/entropy"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-10, abs=1e-12), k
    # the mismatch diagnostics from the fused pi_old equal the recompute's
    ma = mismatch_metrics(batch[ROLLOUT_LOGPROBS], part[OLD_LOGPROBS], m, corr_a, batch[ADVANTAGES])
    mb = mismatch_metrics(batch[ROLLOUT_LOGPROBS], fused[OLD_LOGPROBS], m, corr_b, batch[ADVANTAGES])
    assert ma.keys() == mb.keys()
    for k in ma:
        assert float(ma[k]) == pytest.approx(float(mb[k]), rel=1e-9, abs=1e-12), k


def test_fused_lean_step_equals_recompute_lean_step_float32():
    """The lean step (the flat group is neither recomputed nor trained) in the default float32:
    the same update to float32 rounding, the same diagnostics on the recomputed rows."""
    batch = make_batch(dtype=torch.float32)
    keep = signal_rows(batch, LOSS_MASK)
    assert 0 < int(keep.sum()) < N
    a, b = trainer(torch.float32), trainer(torch.float32)
    sa, part, corr_a = recompute_path(a, batch, "token-tis", "token-mean", keep)
    sb, fused, corr_b = fused_path(b, batch, "token-tis", "token-mean", keep)
    assert max_diff(a, b) <= 1e-6  # lr 3e-2: the update is ~3e-2, rounding ~1e-7
    assert float(fused[OLD_LOGPROBS][~keep].abs().max()) == 0.0  # rows not kept: never forwarded
    assert float((part[OLD_LOGPROBS] - fused[OLD_LOGPROBS])[keep].abs().max()) <= 1e-6
    for k in ("loss/total", "train/grad_norm", "train/tokens", "train/seqs"):
        assert sa[k] == pytest.approx(sb[k], rel=1e-5), k
    m = batch[LOSS_MASK][keep]
    ma = mismatch_metrics(batch[ROLLOUT_LOGPROBS][keep], part[OLD_LOGPROBS][keep], m, None, batch[ADVANTAGES][keep])
    mb = mismatch_metrics(batch[ROLLOUT_LOGPROBS][keep], fused[OLD_LOGPROBS][keep], m, None, batch[ADVANTAGES][keep])
    for k in ma:
        assert float(ma[k]) == pytest.approx(float(mb[k]), rel=1e-4, abs=1e-6), k


def test_fused_lean_step_rejects_a_masking_correction():
    batch = make_batch()
    with pytest.raises(ValueError, match="only reweights"):
        fused_path(trainer(), batch, "token-mis", "token-mean", signal_rows(batch, LOSS_MASK))


def worker(rank, world, port, expect):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        t = Trainer(build_model(ARGS, seed=3, dtype=torch.float64), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1e9, 40, True),
                    mesh=mesh)  # packed forwards (the single-process reference is padded)
        rows = slice(0, 8) if rank == 0 else slice(8, 12)  # ragged shares, different micro-batch counts
        stats, fused, corr = fused_path(t, make_batch(flat_groups=())[rows], "token-mis", "token-mean")
        for k in ("loss/total", "train/grad_norm", "train/tokens", "train/seqs"):
            assert abs(stats[k] - expect[k]) <= 1e-10 * max(1.0, abs(expect[k])), (k, stats[k], expect[k])
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # as in test_lean_dist: skip the FSDP/gloo teardown


def test_fused_step_with_rejections_on_two_ranks_equals_single_process():
    full = make_batch(flat_groups=())
    sa, part, _ = recompute_path(trainer(), full, "token-mis", "token-mean")
    assert float(part[TRAIN_MASK].sum()) < float(full[LOSS_MASK].sum())  # MIS rejected tokens
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, sa), nprocs=2, join=True)
