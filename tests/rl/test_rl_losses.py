"""Policy losses: closed-form values, gradcheck, and the on-policy REINFORCE limit."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidpt.rl.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    aggregate,
    cispo_loss,
    gspo_loss,
    gspo_token_loss,
    is_pg_loss,
    loss_norm,
    ppo_loss,
    reinforce_loss,
)

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None)
F64 = torch.float64

# --- closed-form fixture -------------------------------------------------------------------
# two trajectories, T = 4; row 0 has 3 policy tokens, row 1 has 2 and one padding slot with
# garbage that must not matter.
LP = [[-1.0, -0.5, -2.0, -0.2], [-0.3, -1.1, -0.7, 55.0]]
OLD = [[-1.2, -1.0, -1.0, -1.5], [-0.3, -1.0, -0.9, -60.0]]
ADV = [[1.0, 2.0, -1.0, -0.5], [0.7, -0.7, 0.0, 1e6]]
MASK = [[False, True, True, True], [True, True, False, False]]


def fixture():
    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    return t(LP), t(OLD), t(ADV), torch.tensor(MASK)


def cells():
    return [(n, t) for n in range(2) for t in range(4) if MASK[n][t]]


def test_ppo_fixture():
    lp, old, adv, mask = fixture()
    el, eh, c = 0.2, 0.28, 3.0
    want = torch.zeros(2, 4, dtype=F64)
    want_dual = torch.zeros(2, 4, dtype=F64)
    for n, t in cells():
        r = math.exp(LP[n][t] - OLD[n][t])
        a = ADV[n][t]
        obj = min(r * a, min(max(r, 1 - el), 1 + eh) * a)
        want[n, t] = -obj
        want_dual[n, t] = -max(obj, c * a) if a < 0 else -obj
    torch.testing.assert_close(ppo_loss(lp, old, adv, mask, el, eh), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        ppo_loss(lp, old, adv, mask, el, eh, dual_clip=c), want_dual, rtol=0, atol=1e-12
    )
    # the fixture exercises each branch: unclipped, clipped high, clipped low, dual-clipped
    assert want[0, 2] == pytest.approx(0.8) and want[0, 3] == pytest.approx(0.5 * math.exp(1.3))
    assert want_dual[0, 3] == pytest.approx(1.5) and want[0, 2] == pytest.approx(0.8)


def test_gspo_fixture():
    lp, old, adv, mask = fixture()
    el, eh = 0.05, 0.1
    want = torch.zeros(2, 4, dtype=F64)
    want_tok = torch.zeros(2, 4, dtype=F64)
    for n in range(2):
        ts = [t for t in range(4) if MASK[n][t]]
        s = math.exp(sum(LP[n][t] - OLD[n][t] for t in ts) / len(ts))
        a = sum(ADV[n][t] for t in ts) / len(ts)
        for t in ts:
            want[n, t] = -min(s * a, min(max(s, 1 - el), 1 + eh) * a)
            at = ADV[n][t]
            want_tok[n, t] = -min(s * at, min(max(s, 1 - el), 1 + eh) * at)
    torch.testing.assert_close(gspo_loss(lp, old, adv, mask, el, eh), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(gspo_token_loss(lp, old, adv, mask, el, eh), want_tok, rtol=0, atol=1e-12)


def test_cispo_reinforce_is_pg_fixture():
    lp, old, adv, mask = fixture()
    el, eh, cap = 1.0, 0.5, 1.5
    w_cispo = torch.zeros(2, 4, dtype=F64)
    w_rf = torch.zeros(2, 4, dtype=F64)
    w_is = torch.zeros(2, 4, dtype=F64)
    for n, t in cells():
        r = math.exp(LP[n][t] - OLD[n][t])
        w_cispo[n, t] = -min(max(r, 1 - el), 1 + eh) * ADV[n][t] * LP[n][t]
        w_rf[n, t] = -ADV[n][t] * LP[n][t]
        w_is[n, t] = -min(r, cap) * ADV[n][t] * LP[n][t]
    torch.testing.assert_close(cispo_loss(lp, old, adv, mask, el, eh), w_cispo, rtol=0, atol=1e-12)
    torch.testing.assert_close(reinforce_loss(lp, old, adv, mask), w_rf, rtol=0, atol=1e-12)
    torch.testing.assert_close(is_pg_loss(lp, old, adv, mask, clip_c=cap), w_is, rtol=0, atol=1e-12)
    # gradients: CISPO d/dlogpi = -clip(r) A (weight detached), IS-PG = -min(r, C) A
    lp.requires_grad_(True)
    cispo_loss(lp, old, adv, mask, el, eh).sum().backward()
    want_g = torch.zeros(2, 4, dtype=F64)
    for n, t in cells():
        want_g[n, t] = -min(max(math.exp(LP[n][t] - OLD[n][t]), 1 - el), 1 + eh) * ADV[n][t]
    torch.testing.assert_close(lp.grad, want_g, rtol=0, atol=1e-12)


def test_aggregate_fixture():
    loss = torch.tensor([[9.0, 1.0, 2.0, 3.0], [4.0, 5.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor(MASK)
    want = {
        "token-mean": (1 + 2 + 3 + 4 + 5) / 5,
        "seq-mean-token-mean": ((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2,
        "seq-mean-token-sum": ((1 + 2 + 3) + (4 + 5)) / 2,
        "seq-mean-token-sum-norm": ((1 + 2 + 3) + (4 + 5)) / (2 * 8.0),
    }
    for mode in AGG_MODES:
        norm = loss_norm(mask, mode, norm_len=8.0)
        assert (norm.num_tokens, norm.num_seqs) == (5.0, 2.0)
        assert float(aggregate(loss, mask, norm)) == pytest.approx(want[mode], abs=1e-12)


# --- gradcheck ------------------------------------------------------------------------------


def safe_inputs(seed, N=3, T=5):
    """float64 inputs whose ratios stay >= 1e-3 away from every clip boundary (gradcheck
    takes finite differences, which are wrong across a kink)."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(N, T, generator=g, dtype=F64) * 2 - 0.1
    old = lp + torch.randn(N, T, generator=g, dtype=F64) * 0.3
    adv = torch.randn(N, T, generator=g, dtype=F64)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[0, 0] = False
    mask[1, T - 2 :] = False
    bounds = [0.8, 1.28, 0.95, 1.05, 0.0, 5.0, 0.5, 1.5]
    r = (lp - old).exp()
    s = ((lp - old) * mask).sum(-1) / mask.sum(-1)
    for b in bounds:
        assert (r - b).abs().min() > 1e-3 and (s.exp() - b).abs().min() > 1e-3
    return lp.requires_grad_(True), old, adv, mask


LOSS_KW = {
    "ppo": [dict(eps_low=0.2, eps_high=0.28), dict(eps_low=0.2, eps_high=0.28, dual_clip=1.5)],
    "gspo": [dict(eps_low=0.05, eps_high=0.05)],
    "gspo_token": [dict(eps_low=0.05, eps_high=0.05)],
    "cispo": [dict(eps_low=0.5, eps_high=0.5)],
    "reinforce": [dict()],
    "is_pg": [dict(), dict(clip_c=1.5)],
}


def gradcheck_fn(name, kw, x0, old, adv, mask):
    """The function whose derivative the loss's autograd gradient must be, at x0.

    CISPO, IS-PG and GSPO-token contain stop-gradients (sg), so their value as a function of
    log pi is not the function they differentiate: finite differences must hold the sg factors
    at their value at x0. For CISPO and IS-PG, shifting the anchor with x keeps the detached
    ratio fixed while log pi moves. GSPO-token's value is s_i whatever log pi_t is (its
    pi_t / sg[pi_t] factor is 1), so its frozen surrogate is written out: PPO with per-token
    anchors x0_t - log s_i, whose ratio is s_i pi_t / pi_t(x0); ``test_gradcheck`` also checks
    that GSPO-token's autograd gradient at x0 equals this surrogate's.
    """
    fn = POLICY_LOSSES[name]
    if name in ("cispo", "is_pg"):
        return lambda x: fn(x, old + (x.detach() - x0), adv, mask, **kw)
    if name == "gspo_token":
        log_s = ((x0 - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)  # [N, 1]
        return lambda x: ppo_loss(x, x0 - log_s, adv, mask, kw["eps_low"], kw["eps_high"])
    return lambda x: fn(x, old, adv, mask, **kw)


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_gradcheck(name, mode):
    lp, old, adv, mask = safe_inputs(0)
    x0 = lp.detach().clone()
    norm = loss_norm(mask, mode, norm_len=6.0)
    for kw in LOSS_KW[name]:
        ref = gradcheck_fn(name, kw, x0, old, adv, mask)
        assert torch.autograd.gradcheck(lambda x: aggregate(ref(x), mask, norm), (lp,), eps=1e-6, atol=1e-7)
        assert torch.autograd.gradcheck(ref, (lp,), eps=1e-6, atol=1e-7)
        # the loss's own autograd gradient at x0 is the checked one
        (g_loss,) = torch.autograd.grad(
            aggregate(POLICY_LOSSES[name](lp, old, adv, mask, **kw), mask, norm), lp
        )
        (g_ref,) = torch.autograd.grad(aggregate(ref(lp), mask, norm), lp)
        torch.testing.assert_close(g_loss, g_ref, rtol=1e-12, atol=1e-14)
        assert g_loss.abs().sum() > 0
    # the aggregate w.r.t. the per-token loss values
    loss = torch.randn(mask.shape, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: aggregate(x, mask, norm), (loss,))


def test_all_losses_have_kwargs_covered():
    assert set(LOSS_KW) == set(POLICY_LOSSES)


# --- the on-policy limit: pi = pi_old = mu ------------------------------------------------


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 7), st.integers(0, 2**31 - 1), st.sampled_from(AGG_MODES))
def test_on_policy_gradient_equals_reinforce(N, T, seed, mode):
    """At pi = pi_old every ratio is 1 and no clip is active, so every loss's gradient w.r.t. the
    logits equals REINFORCE's: sum_t coef_t (-A_t) grad log pi_t."""
    g = torch.Generator().manual_seed(seed)
    V = 4
    logits = torch.randn(N, T, V, generator=g, dtype=F64).requires_grad_(True)
    tokens = torch.randint(0, V, (N, T), generator=g)
    mask = torch.rand(N, T, generator=g) < 0.7
    mask[0, 0] = True
    adv_seq = torch.randn(N, generator=g, dtype=F64)
    adv = adv_seq[:, None].expand(N, T).clone()  # GSPO's sequence advantage == per-token one
    norm = loss_norm(mask, mode, norm_len=5.0)

    def grad_of(name, kw):
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]  # [N, T]
        old = lp.detach()
        (gr,) = torch.autograd.grad(
            aggregate(POLICY_LOSSES[name](lp, old, adv, mask, **kw), mask, norm), logits
        )
        return gr

    want = grad_of("reinforce", {})
    assert want.abs().sum() > 0
    for name, kws in LOSS_KW.items():
        for kw in kws:
            torch.testing.assert_close(grad_of(name, kw), want, rtol=1e-10, atol=1e-12, msg=f"{name} {kw}")


def test_dual_clip_bounds_negative_advantage_loss():
    lp = torch.tensor([[3.0, 0.0, -5.0]], dtype=F64)
    old = torch.zeros(1, 3, dtype=F64)
    adv = torch.tensor([[-2.0, -2.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = ppo_loss(lp, old, adv, mask, dual_clip=3.0)
    # ratio e^3 ~ 20 on A = -2: PPO alone gives 2 e^3 ~ 40, dual-clip caps it at 3 * 2 = 6
    assert float(loss[0, 0]) == pytest.approx(6.0)
    assert float(ppo_loss(lp, old, adv, mask)[0, 0]) == pytest.approx(2 * math.exp(3.0))
    assert float(loss[0, 1]) == pytest.approx(2.0)
    # A > 0 and ratio below 1 - eps: unclipped min = r A
    assert float(loss[0, 2]) == pytest.approx(-math.exp(-5.0))
