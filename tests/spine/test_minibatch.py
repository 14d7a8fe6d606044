"""PPO mini-batches and epochs (``train.mini_batches`` / ``train.epochs``) on hand-built batches."""

import copy

import torch
from tensordict import TensorDict

from sidpt.batch import ADVANTAGES, GROUP_ID, LOSS_MASK, OLD_LOGPROBS, REWARD, ROLLOUT_LOGPROBS, SEQ_LEN, TOKENS
from sidpt.model import build_model
from sidpt.model.model import ModelArgs
from sidpt.rl import TRAIN_MASK, all_reduce_norm, apply_correction, compute_advantages, loss_norm, micro_batch_loss
from sidpt.trainer import OptimConfig, Trainer, micro_batches, sequence_logprobs

ARGS = ModelArgs(vocab_size=41)
EPS_LOW, EPS_HIGH = 0.2, 0.28


def make_batch(dtype=torch.float64) -> TensorDict:
    g = torch.Generator().manual_seed(11)
    n, T = 8, 14
    seq_len = torch.randint(9, T + 1, (n,), generator=g)
    pos = torch.arange(T)[None, :]
    mask = (pos >= 3) & (pos < seq_len[:, None])
    batch = TensorDict({
        TOKENS: torch.randint(0, 41, (n, T), generator=g), SEQ_LEN: seq_len, LOSS_MASK: mask,
        GROUP_ID: torch.arange(n) // 4, REWARD: torch.tensor([1., 0., 0., 1., 0., 1., 1., 1.]),
    }, batch_size=[n])
    with torch.no_grad():
        lp, _ = sequence_logprobs(build_model(ARGS, seed=4, dtype=dtype), batch[TOKENS], mask=mask)
    batch[ROLLOUT_LOGPROBS] = torch.where(mask, lp, 0.0).float()
    return compute_advantages(batch, "grpo")


def trainer(dtype=torch.float64, lr=5e-2) -> Trainer:
    return Trainer(build_model(ARGS, seed=4, dtype=dtype), OptimConfig(lr, 0.0, (0.9, 0.99), 1e9, 40))


def step(t: Trainer, batch: TensorDict, **kw) -> dict:
    return t.rl_step(batch, agg="token-mean", loss="ppo", loss_kwargs={"eps_low": EPS_LOW, "eps_high": EPS_HIGH},
                     kl_coef=0.0, entropy_coef=0.0, **kw)


def test_second_mini_batch_ratio_leaves_one_and_its_clip_fraction_matches_float64():
    t = trainer()
    batch, _ = apply_correction(t.recompute(make_batch()), "none")
    stats = step(t, batch, mini_batches=2)
    assert stats["train/optimizer_steps"] == 2 and len(t.minibatch_stats) == 2
    assert t.minibatch_stats[0]["loss/clip_frac"] == 0.0  # the first step starts at pi = pi_old
    # the reference: the first step alone, then the second chunk's ratios in float64 by hand
    ref = trainer()
    step(ref, batch[:4])
    second = batch[4:]
    with torch.no_grad():
        lp, _ = sequence_logprobs(ref.model, second[TOKENS], mask=second[LOSS_MASK])
    m, adv = second[LOSS_MASK], second[ADVANTAGES].double()
    ratio = torch.where(m, (lp.double() - second[OLD_LOGPROBS].double()).exp(), 1.0)
    assert float((ratio - 1).abs().max()) > 1e-2  # pi moved: the ratio is no longer 1
    clipped = ((adv > 0) & (ratio > 1 + EPS_HIGH)) | ((adv < 0) & (ratio < 1 - EPS_LOW))
    count, n_tok = int((clipped & m).sum()), int(m.sum())
    assert count > 0  # the clip acts
    got = t.minibatch_stats[1]["loss/clip_frac"]  # a float32 metric: the same count of clipped tokens
    assert round(got * n_tok) == count and abs(got - count / n_tok) <= 1e-7
    assert stats["loss/clip_frac_last"] == got
    for (n, p), (_, q) in zip(t.model.named_parameters(), ref.model.named_parameters()):
        assert not torch.equal(p, q), n  # the second step moved the weights on


def test_epochs_repeat_the_pass():
    t = trainer()
    batch, _ = apply_correction(t.recompute(make_batch()), "none")
    stats = step(t, batch, mini_batches=2, epochs=3)
    assert stats["train/optimizer_steps"] == 6
    assert t.minibatch_stats[2]["loss/clip_frac"] > 0  # epoch 2 starts away from pi_old


def old_step(t: Trainer, batch: TensorDict) -> dict:
    """The RL update as it was before mini-batches (the loop of trainer.rl_step, issue 14)."""
    norm = all_reduce_norm(loss_norm(batch[TRAIN_MASK], "token-mean", None))
    t.opt.zero_grad(set_to_none=True)
    for mb in micro_batches(batch, t.cfg.micro_batch_tokens):
        lp, ent = sequence_logprobs(t.model, mb[TOKENS], entropy=True, mask=mb[TRAIN_MASK] | mb[LOSS_MASK])
        total, _ = micro_batch_loss(lp, mb, norm, loss="ppo", loss_kwargs={"eps_low": EPS_LOW, "eps_high": EPS_HIGH},
                                    entropy=ent.detach())
        total.backward()
    gn = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
    t.opt.step()
    return {"train/grad_norm": float(gn)}


def test_one_mini_batch_one_epoch_is_the_plain_step_bitwise():
    for dtype in (torch.float32, torch.float64):
        a, b = trainer(dtype, lr=1e-2), trainer(dtype, lr=1e-2)
        batch, _ = apply_correction(a.recompute(make_batch(dtype)), "token-tis")
        got = step(a, copy.deepcopy(batch), mini_batches=1, epochs=1)
        want = old_step(b, copy.deepcopy(batch))
        assert got["train/grad_norm"] == want["train/grad_norm"] > 0
        for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
            assert torch.equal(p, q), (dtype, n)
