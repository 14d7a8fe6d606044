"""Loss aggregation: micro-batch / rank splits and right-padding leave loss and gradient unchanged."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from sidpt.batch import ADVANTAGES, LOSS_MASK, OLD_LOGPROBS, REF_LOGPROBS, ROLLOUT_LOGPROBS, TOKENS
from sidpt.rl.correction import apply_correction, mismatch_metrics
from sidpt.rl.kl import entropy_from_logits
from sidpt.rl.losses import (
    AGG_MODES,
    IS_WEIGHT,
    POLICY_LOSSES,
    TRAIN_MASK,
    LossNorm,
    aggregate,
    loss_norm,
    micro_batch_loss,
)

F64 = torch.float64
V = 5
LOSS_KW = {
    "ppo": dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0),
    "gspo": dict(eps_low=0.02, eps_high=0.03),
    "gspo_token": dict(eps_low=0.02, eps_high=0.03),
    "cispo": dict(eps_low=1.0, eps_high=0.5),
    "reinforce": dict(),
    "is_pg": dict(clip_c=1.5),
}


def make_batch(seed, N, T):
    """A right-padded float64 batch with a policy (logits leaf), drifted pi_old, mu and pi_ref."""
    g = torch.Generator().manual_seed(seed)
    seq_len = torch.randint(1, T + 1, (N,), generator=g)
    seq_len[0] = T  # the batch's padded length is exactly T
    pos = torch.arange(T)[None, :]
    prompt = torch.randint(0, 2, (N, 1), generator=g)
    mask = (pos < seq_len[:, None]) & (pos >= prompt)  # [N, T]
    mask[:, 0] |= seq_len == 1  # every row has at least one policy token
    tokens = torch.randint(0, V, (N, T), generator=g)
    logits = torch.randn(N, T, V, generator=g, dtype=F64)
    lp0 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    old = lp0 + 0.2 * torch.randn(N, T, generator=g, dtype=F64)
    batch = TensorDict(
        {
            TOKENS: tokens,
            LOSS_MASK: mask,
            OLD_LOGPROBS: old,
            ROLLOUT_LOGPROBS: old + 0.3 * torch.randn(N, T, generator=g, dtype=F64),
            REF_LOGPROBS: lp0 + 0.2 * torch.randn(N, T, generator=g, dtype=F64),
            ADVANTAGES: torch.where(mask, torch.randn(N, T, generator=g, dtype=F64), 0.0),
        },
        batch_size=[N],
    )
    batch[ROLLOUT_LOGPROBS][0] = old[0]  # row 0 is never rejected: no all-zero loss
    batch, _ = apply_correction(batch, "token-mis", lo=0.6, hi=1.6)  # some tokens rejected
    return batch, logits


def step_loss(logits, mb, norm, name):
    """The trainer's micro-batch loss: logprobs and entropy from the logits of this micro-batch."""
    lp = torch.log_softmax(logits, -1).gather(-1, mb[TOKENS][..., None])[..., 0]  # [n, t]
    ent = entropy_from_logits(logits)
    loss, _ = micro_batch_loss(
        lp,
        mb,
        norm,
        loss=name,
        loss_kwargs=LOSS_KW[name],
        kl_coef=0.1,
        kl_kind="k3",
        entropy=ent,
        entropy_coef=0.01,
    )
    return loss


def trim(mb):
    """Cut a micro-batch's padding to its own longest row, as a length-sorted packer would."""
    t = int(mb[LOSS_MASK].any(0).nonzero().max()) + 1
    return mb.apply(lambda x: x[:, :t] if x.dim() >= 2 else x, batch_size=mb.batch_size)


def split_points(draw, n):
    cuts = draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=n, unique=True)) if n > 1 else []
    return [0] + sorted(c for c in cuts if 0 < c < n) + [n]


@st.composite
def layouts(draw):
    """(N, T, seed, ranks): ranks is a list of rank row-ranges, each a list of micro-batch cuts."""
    N = draw(st.integers(1, 9))
    T = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    R = draw(st.integers(1, 4))
    bounds = sorted(draw(st.lists(st.integers(0, N), min_size=R - 1, max_size=R - 1)))
    bounds = [0] + bounds + [N]  # a rank may get no trajectory
    ranks = []
    for r in range(R):
        lo, hi = bounds[r], bounds[r + 1]
        ranks.append([lo + c for c in split_points(draw, hi - lo)] if hi > lo else [])
    return N, T, seed, ranks


@pytest.mark.parametrize("mode", AGG_MODES)
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(layouts(), st.sampled_from(list(POLICY_LOSSES)))
def test_split_over_microbatches_and_ranks(mode, layout, name):
    N, T, seed, ranks = layout
    batch, logits0 = make_batch(seed, N, T)

    logits = logits0.clone().requires_grad_(True)
    norm = loss_norm(batch[TRAIN_MASK], mode, norm_len=6.0)
    full = step_loss(logits, batch, norm, name)
    (g_full,) = torch.autograd.grad(full, logits)
    assert g_full.abs().sum() > 0

    # each rank counts its own rows; the "all-reduce" sums them
    local = [loss_norm(batch[TRAIN_MASK][c[0] : c[-1]], mode, norm_len=6.0) for c in ranks if c]
    norm_g = local[0]
    for n in local[1:]:
        norm_g = norm_g + n
    assert (norm_g.num_tokens, norm_g.num_seqs) == (norm.num_tokens, norm.num_seqs)

    logits = logits0.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    for cuts in ranks:
        for a, b in zip(cuts[:-1], cuts[1:]):
            mb = trim(batch[a:b])
            t = mb[TOKENS].shape[1]
            loss = step_loss(logits[a:b, :t], mb, norm_g, name)
            loss.backward()  # gradient accumulation: plain sum, no division by the micro-batch count
            total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(logits.grad, g_full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", AGG_MODES)
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
    st.sampled_from(list(POLICY_LOSSES)),
)
def test_invariant_to_right_padding(mode, N, T, extra, seed, name):
    batch, logits0 = make_batch(seed, N, T)
    g = torch.Generator().manual_seed(seed + 1)

    def pad(x):
        if x.dim() < 2:
            return x
        if x.dtype == torch.bool:
            return torch.cat([x, torch.zeros(N, extra, *x.shape[2:], dtype=torch.bool)], 1)
        if not x.is_floating_point():  # token ids: any in-vocabulary id
            return torch.cat([x, torch.randint(0, V, (N, extra), generator=g)], 1)
        fill = (torch.randn(N, extra, *x.shape[2:], generator=g) * 50).to(x.dtype)  # garbage, not zeros
        return torch.cat([x, fill], 1)

    padded = batch.apply(pad, batch_size=[N])
    logits_p0 = pad(logits0)

    logits = logits0.clone().requires_grad_(True)
    loss = step_loss(logits, batch, loss_norm(batch[TRAIN_MASK], mode, norm_len=6.0), name)
    (grad,) = torch.autograd.grad(loss, logits)
    logits_p = logits_p0.clone().requires_grad_(True)
    loss_p = step_loss(logits_p, padded, loss_norm(padded[TRAIN_MASK], mode, norm_len=6.0), name)
    (grad_p,) = torch.autograd.grad(loss_p, logits_p)

    torch.testing.assert_close(loss_p, loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_p[:, :T], grad, rtol=0, atol=1e-12)
    assert float(grad_p[:, T:].abs().sum()) == 0.0


def test_per_microbatch_means_differ():
    """The bug this API prevents: averaging per-micro-batch token means is not the token mean."""
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    norm = loss_norm(mask, "token-mean")
    assert norm == LossNorm("token-mean", 4.0, 2.0, 1.0)
    right = aggregate(loss[:1], mask[:1], norm) + aggregate(loss[1:], mask[1:], norm)
    assert float(right) == pytest.approx((1 + 1 + 1 + 4) / 4)
    wrong = (loss[0].sum() / 3 + loss[1, :1].sum() / 1) / 2
    assert float(wrong) == pytest.approx(2.5) and float(right) == pytest.approx(1.75)


def test_micro_batch_loss_fixture():
    """micro_batch_loss composes the pieces as documented: w * ppo + beta * k3 - c * H."""
    lp = torch.tensor([[-1.0, -0.5, -2.0]], dtype=F64)
    mb = TensorDict(
        {
            LOSS_MASK: torch.tensor([[True, True, True]]),
            TRAIN_MASK: torch.tensor([[True, True, False]]),
            IS_WEIGHT: torch.tensor([[0.5, 2.0, 0.0]], dtype=F64),
            "prox_logprobs": torch.tensor([[-1.2, -1.0, -1.0]], dtype=F64),
            ADVANTAGES: torch.tensor([[1.0, 2.0, -1.0]], dtype=F64),
            REF_LOGPROBS: torch.tensor([[-1.1, -0.4, -3.0]], dtype=F64),
        },
        batch_size=[1],
    )
    ent = torch.tensor([[0.3, 0.6, 0.9]], dtype=F64)
    norm = loss_norm(mb[TRAIN_MASK], "token-mean")
    loss, m = micro_batch_loss(lp, mb, norm, loss="ppo", loss_kwargs=dict(eps_low=0.2, eps_high=0.28),
                               kl_coef=0.1, kl_kind="k3", entropy=ent, entropy_coef=0.01)  # fmt: skip
    r0, r1 = math.exp(0.2), math.exp(0.5)
    pg = [-0.5 * min(r0 * 1.0, min(r0, 1.28) * 1.0), -2.0 * min(r1 * 2.0, min(r1, 1.28) * 2.0)]
    k3 = [math.exp(-0.1) - 1 + 0.1, math.exp(0.1) - 1 - 0.1]
    want = sum(pg[i] + 0.1 * k3[i] - 0.01 * [0.3, 0.6][i] for i in range(2)) / 2
    assert float(loss) == pytest.approx(want, abs=1e-12)
    assert float(m["loss/policy"]) == pytest.approx(sum(pg) / 2, abs=1e-12)
    assert float(m["loss/clip_frac"]) == pytest.approx(0.5)  # token 1: r = 1.65 > 1.28 with A > 0


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_infinite_padding_is_harmless(name):
    """Engines and recomputes may leave -inf / nan in padding slots: nothing may leak."""
    batch, logits0 = make_batch(3, 5, 6)
    pad = ~batch[LOSS_MASK]
    assert pad.any()
    for key, fill in [(OLD_LOGPROBS, -torch.inf), (ROLLOUT_LOGPROBS, -torch.inf), (REF_LOGPROBS, torch.nan)]:
        batch[key] = torch.where(pad, fill, batch[key])
    batch, corr = apply_correction(batch, "icepop", lo=0.6, hi=1.6)
    assert torch.isfinite(corr.weight).all()
    stats = mismatch_metrics(
        batch[ROLLOUT_LOGPROBS], batch[OLD_LOGPROBS], batch[LOSS_MASK], corr, batch[ADVANTAGES]
    )
    assert all(torch.isfinite(v) for v in stats.values())
    for kind in ("k1", "k2", "k3"):
        logits = logits0.clone().requires_grad_(True)
        lp = torch.log_softmax(logits, -1).gather(-1, batch[TOKENS][..., None])[..., 0]
        norm = loss_norm(batch[TRAIN_MASK], "token-mean")
        loss, _ = micro_batch_loss(
            lp, batch, norm, loss=name, loss_kwargs=LOSS_KW[name], kl_coef=0.1, kl_kind=kind
        )
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
