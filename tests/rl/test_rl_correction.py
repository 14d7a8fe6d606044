"""Mismatch corrections and diagnostics against float64 arithmetic written out here."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from sidpt.batch import ADVANTAGES, LOSS_MASK, OLD_LOGPROBS, ROLLOUT_LOGPROBS
from sidpt.rl.correction import CORRECTION_MODES, apply_correction, mismatch_correction, mismatch_metrics
from sidpt.rl.losses import IS_WEIGHT, PROX_LOGPROBS, TRAIN_MASK, loss_norm

F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# --- fixture: log rho = log pi_old - log mu per token; None is a non-loss position ---------------
LR = [
    [None, 0.1, -0.9, 0.8],
    [0.05, -0.05, None, None],
    [None, 1.5, -0.2, None],
]
MU = [
    [-0.5, -2.0, -8.0, -1.0],  # mu = e^-8 < 1e-3: a low-probability token
    [-0.3, -0.7, -9.0, -9.0],
    [-4.0, -1.2, -7.5, -3.0],
]
ADV = [[0.0, 1.0, -2.0, 0.5], [0.3, 0.3, 0.0, 0.0], [0.0, -1.0, 1.5, 0.0]]


def fixture():
    mask = torch.tensor([[v is not None for v in row] for row in LR])
    mu = torch.tensor(MU, dtype=F64)
    lr = torch.tensor(
        [[v if v is not None else 7.0 for v in row] for row in LR], dtype=F64
    )  # garbage off mask
    return mu, mu + lr, mask


def tokens(n):
    return [t for t in range(4) if LR[n][t] is not None]


def seq_lr(n):
    return sum(LR[n][t] for t in tokens(n))


def expect(weights, keep):
    """weights[n][t] on kept loss tokens, 0 elsewhere; keep(n, t) -> bool."""
    w = torch.zeros(3, 4, dtype=F64)
    m = torch.zeros(3, 4, dtype=torch.bool)
    for n in range(3):
        for t in tokens(n):
            if keep(n, t):
                w[n, t], m[n, t] = weights(n, t), True
    return w, m


def check(corr, w, m):
    torch.testing.assert_close(corr.weight, w, rtol=0, atol=1e-12)
    assert torch.equal(corr.mask, m)


def test_token_tis_fixture():
    mu, old, mask = fixture()
    c = 2.0
    corr = mismatch_correction(mu, old, mask, "token-tis", c=c)
    check(corr, *expect(lambda n, t: min(math.exp(LR[n][t]), c), lambda n, t: True))
    assert corr.truncated.nonzero().tolist() == [[0, 3], [2, 1]]  # e^0.8 = 2.23, e^1.5 = 4.48
    assert torch.equal(corr.anchor, old)


def test_token_mis_and_icepop_fixture():
    mu, old, mask = fixture()
    corr = mismatch_correction(mu, old, mask, "token-mis")  # default [0, 2]
    check(corr, *expect(lambda n, t: math.exp(LR[n][t]), lambda n, t: math.exp(LR[n][t]) <= 2.0))
    corr = mismatch_correction(mu, old, mask, "icepop", lo=0.5, hi=3.0)
    check(corr, *expect(lambda n, t: math.exp(LR[n][t]), lambda n, t: 0.5 <= math.exp(LR[n][t]) <= 3.0))
    assert corr.mask.sum() == 5  # e^-0.9 = 0.41 and e^1.5 = 4.48 rejected


def test_sequence_modes_fixture():
    mu, old, mask = fixture()
    # seq products: e^0.0 = 1, e^0.0 = 1, e^1.3 = 3.67
    corr = mismatch_correction(mu, old, mask, "seq-tis", c=2.0)
    check(corr, *expect(lambda n, t: min(math.exp(seq_lr(n)), 2.0), lambda n, t: True))
    assert corr.truncated.any(-1).tolist() == [False, False, True]
    corr = mismatch_correction(mu, old, mask, "seq-mis", lo=0.5, hi=2.0)
    check(corr, *expect(lambda n, t: math.exp(seq_lr(n)), lambda n, t: 0.5 <= math.exp(seq_lr(n)) <= 2.0))
    assert corr.mask.any(-1).tolist() == [True, True, False]
    # geometric mean: exp(0 / 3) = 1, exp(0 / 2) = 1, exp(1.3 / 2) = 1.92
    corr = mismatch_correction(mu, old, mask, "geo-mis", lo=0.9, hi=1.5)
    check(corr, *expect(lambda n, t: 1.0, lambda n, t: 0.9 <= math.exp(seq_lr(n) / len(tokens(n))) <= 1.5))
    assert corr.mask.any(-1).tolist() == [True, True, False]

    # k3 rejection: per-trajectory mean of rho - 1 - log rho
    def k3(n):
        return sum(math.exp(LR[n][t]) - 1 - LR[n][t] for t in tokens(n)) / len(tokens(n))

    thr = 0.3  # k3(0) = 0.254, k3(1) = 0.00125, k3(2) = 1.06
    corr = mismatch_correction(mu, old, mask, "k3-rs", k3_max=thr)
    check(corr, *expect(lambda n, t: 1.0, lambda n, t: k3(n) <= thr))
    assert corr.mask.any(-1).tolist() == [True, True, False]

    # trust-region masking: a trajectory goes once its largest per-token k3 exceeds tr_max
    def k3_max(n):
        return max(math.exp(LR[n][t]) - 1 - LR[n][t] for t in tokens(n))

    kept = []
    for tr in (0.05, 0.5, 2.0):
        corr = mismatch_correction(mu, old, mask, "tr-mask", c=2.0, tr_max=tr)
        check(corr, *expect(lambda n, t: min(math.exp(LR[n][t]), 2.0), lambda n, t: k3_max(n) <= tr))
        kept.append(corr.mask.any(-1).sum().item())
    assert kept[0] < kept[-1]  # the thresholds separate the fixture's trajectories


def test_bypass_form():
    mu, old, mask = fixture()
    corr = mismatch_correction(mu, old, mask, "token-tis", "bypass", c=2.0)
    check(corr, *expect(lambda n, t: 1.0, lambda n, t: True))  # the PPO ratio pi / mu does the IS
    assert torch.equal(corr.anchor, mu) and not corr.truncated.any()
    corr = mismatch_correction(mu, old, mask, "icepop", "bypass", lo=0.5, hi=3.0)
    check(corr, *expect(lambda n, t: 1.0, lambda n, t: 0.5 <= math.exp(LR[n][t]) <= 3.0))
    corr = mismatch_correction(mu, None, mask, "icepop", "bypass")  # no recompute: nothing masked
    assert torch.equal(corr.mask, mask) and torch.equal(corr.anchor, mu)
    with pytest.raises(ValueError):
        mismatch_correction(mu, None, mask, "icepop", "decoupled")


def test_apply_correction_writes_keys():
    mu, old, mask = fixture()
    batch = TensorDict({ROLLOUT_LOGPROBS: mu, OLD_LOGPROBS: old, LOSS_MASK: mask}, batch_size=[3])
    out, corr = apply_correction(batch, "token-mis", hi=2.0)
    assert torch.equal(out[IS_WEIGHT], corr.weight) and torch.equal(out[TRAIN_MASK], corr.mask)
    assert torch.equal(out[PROX_LOGPROBS], old) and IS_WEIGHT not in batch.keys()


@pytest.mark.parametrize("form", ["decoupled", "bypass"])
@pytest.mark.parametrize("mode", CORRECTION_MODES)
def test_identity_when_on_policy(mode, form):
    """pi_old = mu: every weight is 1 and no loss token is masked or truncated."""
    g = torch.Generator().manual_seed(0)
    mu = -torch.rand(4, 6, generator=g, dtype=F64) * 5
    mask = torch.rand(4, 6, generator=g) < 0.7
    mask[:, 0] = True
    corr = mismatch_correction(mu, mu.clone(), mask, mode, form)
    assert torch.equal(corr.mask, mask)
    torch.testing.assert_close(corr.weight, mask.to(F64), rtol=0, atol=0)
    assert not corr.truncated.any()


log_ratios = st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=12)


@SETTINGS
@given(log_ratios, st.floats(0.05, 1.0), st.floats(1.0, 8.0))
def test_icepop_and_mis_mask_exactly_outside_bounds(lrs, lo, hi):
    lr = torch.tensor([lrs], dtype=F64)
    mu = torch.full_like(lr, -2.0)
    mask = torch.ones_like(lr, dtype=torch.bool)
    for mode in ("icepop", "token-mis"):
        corr = mismatch_correction(mu, mu + lr, mask, mode, lo=lo, hi=hi)
        for t, x in enumerate(lrs):
            rho = math.exp(min(max(x, -20.0), 20.0))
            inside = lo <= rho <= hi
            if abs(rho - lo) < 1e-9 * lo or abs(rho - hi) < 1e-9 * hi:
                continue  # on a bound to within rounding: either side is right
            assert bool(corr.mask[0, t]) == inside
            assert float(corr.weight[0, t]) == pytest.approx(rho if inside else 0.0, rel=1e-12)


@SETTINGS
@given(log_ratios, st.floats(1.0, 10.0), st.sampled_from(["token-tis", "seq-tis"]))
def test_tis_weight_never_above_c(lrs, c, mode):
    lr = torch.tensor([lrs, [-x for x in lrs]], dtype=F64)
    mu = torch.full_like(lr, -1.0)
    mask = torch.ones_like(lr, dtype=torch.bool)
    for dtype in (F64, torch.float32):
        corr = mismatch_correction(mu.to(dtype), (mu + lr).to(dtype), mask, mode, c=c)
        assert (corr.weight <= c).all() and (corr.weight > 0).all() and torch.isfinite(corr.weight).all()

    def clamp(x):  # the documented safety bound: each token's log-ratio, then their sum
        return max(min(x, 20.0), -20.0)

    for n in range(2):
        sign = 1 if n == 0 else -1
        s = clamp(sum(clamp(sign * x) for x in lrs))
        for t, x in enumerate(lrs):
            want = min(math.exp(clamp(sign * x) if mode == "token-tis" else s), c)
            assert float(corr.weight[n, t]) == pytest.approx(want, rel=1e-5)


def test_diagnostics_fixture():
    mu, old, mask = fixture()
    corr = mismatch_correction(mu, old, mask, "token-tis", c=2.0)
    adv = torch.tensor(ADV, dtype=F64)
    out = mismatch_metrics(mu, old, mask, corr, adv)
    lrs = [LR[n][t] for n in range(3) for t in tokens(n)]
    n_tok = len(lrs)
    rho = [math.exp(x) for x in lrs]
    seqs = [seq_lr(n) for n in range(3)]
    w = [min(r, 2.0) for r in rho]
    want = {
        "abs_log_ratio_mean": sum(abs(x) for x in lrs) / n_tok,
        "abs_log_ratio_max": 1.5,
        "seq_abs_log_ratio_mean": sum(abs(s) for s in seqs) / 3,
        "seq_abs_log_ratio_max": 1.3,
        "kl_k1": sum(-x for x in lrs) / n_tok,
        "kl_k3": sum(math.exp(x) - 1 - x for x in lrs) / n_tok,
        "chi2_token": sum(r * r for r in rho) / n_tok - 1,
        "chi2_seq": sum(math.exp(2 * s) for s in seqs) / 3 - 1,
        "ess_ratio": sum(rho) ** 2 / (n_tok * sum(r * r for r in rho)),
        "ess_weight": sum(w) ** 2 / (n_tok * sum(x * x for x in w)),
        "ppl_ratio": math.exp(sum(-x for x in lrs) / n_tok),
        "frac_outside_band": sum(1 for r in rho if r < 0.5 or r > 2.0) / n_tok,
        "frac_tokens_masked": 0.0,
        "frac_seqs_masked": 0.0,
        "frac_tokens_truncated": 2 / n_tok,
        "frac_seqs_truncated": 2 / 3,
    }
    # gradient share: g = -w A / n_tok (token-mean); low-probability tokens: mu < 1e-3
    g2 = {
        (n, t): (min(math.exp(LR[n][t]), 2.0) * ADV[n][t] / n_tok) ** 2 for n in range(3) for t in tokens(n)
    }
    low = [(n, t) for (n, t) in g2 if math.exp(MU[n][t]) < 1e-3]
    assert low == [(0, 2), (2, 2)]
    want["low_prob_grad_share"] = sum(g2[k] for k in low) / sum(g2.values())
    assert set(out) == {"mismatch/" + k for k in want}
    for k, v in want.items():
        assert float(out["mismatch/" + k]) == pytest.approx(v, rel=1e-10, abs=1e-12), k
    # a masking correction: one of 7 tokens rejected, no trajectory fully rejected
    corr = mismatch_correction(mu, old, mask, "icepop", lo=0.3, hi=4.0)
    out = mismatch_metrics(mu, old, mask, corr)
    assert float(out["mismatch/frac_tokens_masked"]) == pytest.approx(1 / 7)
    assert float(out["mismatch/frac_seqs_masked"]) == 0.0
    corr = mismatch_correction(mu, old, mask, "seq-mis", lo=0.5, hi=2.0)
    out = mismatch_metrics(mu, old, mask, corr, adv, loss_norm(corr.mask, "seq-mean-token-mean"))
    assert float(out["mismatch/frac_seqs_masked"]) == pytest.approx(1 / 3)
    assert float(out["mismatch/frac_tokens_masked"]) == pytest.approx(2 / 7)
    # seq-mean-token-mean over the 2 kept trajectories: g = -w A / (n_i * 2), w = e^0 = 1
    g2 = {(0, t): (ADV[0][t] / (3 * 2)) ** 2 for t in tokens(0)} | {
        (1, t): (ADV[1][t] / 4) ** 2 for t in tokens(1)
    }
    want_share = g2[(0, 2)] / sum(g2.values())
    assert float(out["mismatch/low_prob_grad_share"]) == pytest.approx(want_share, rel=1e-10)


def test_diagnostics_on_policy_are_trivial():
    mu, _, mask = fixture()
    out = mismatch_metrics(mu, mu.clone(), mask, mismatch_correction(mu, mu.clone(), mask, "token-tis"))
    for k in ("abs_log_ratio_mean", "abs_log_ratio_max", "kl_k1", "kl_k3", "chi2_token", "chi2_seq"):
        assert float(out["mismatch/" + k]) == pytest.approx(0.0, abs=1e-15), k
    for k in ("ess_ratio", "ess_weight", "ppl_ratio"):
        assert float(out["mismatch/" + k]) == pytest.approx(1.0, abs=1e-15), k


def test_unknown_mode_raises():
    mu, old, mask = fixture()
    with pytest.raises(ValueError):
        mismatch_correction(mu, old, mask, "tis")
    batch = TensorDict({ROLLOUT_LOGPROBS: mu, LOSS_MASK: mask, ADVANTAGES: mu}, batch_size=[3])
    with pytest.raises(ValueError):
        apply_correction(batch, "token-tis")  # decoupled needs OLD_LOGPROBS
