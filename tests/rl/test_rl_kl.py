"""KL estimators (values, Monte-Carlo means, exact expected gradients) and entropy."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidpt.rl.kl import KL_KINDS, entropy_from_logits, kl_estimate

F64 = torch.float64


def test_kl_fixture():
    lp = torch.tensor([[-1.0, -0.2, -3.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -0.1, -1.0]], dtype=F64)
    for kind in KL_KINDS:
        got = kl_estimate(lp, ref, kind)
        for t in range(3):
            lr = float(ref[0, t]) - float(lp[0, t])  # log r = log pi_ref - log pi
            want = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1 - lr}[kind]
            assert float(got[0, t]) == pytest.approx(want, abs=1e-14)
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


def categorical_pair(seed, V=6, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g, dtype=F64), 0)
    q = torch.softmax(torch.log(p) + scale * torch.randn(V, generator=g, dtype=F64), 0)
    return p, q


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 0.3), (2, 0.1)])
def test_monte_carlo_means_match_exact_kl(seed, scale):
    p, q = categorical_pair(seed, scale=scale)
    kl = float((p * (p / q).log()).sum())  # exact KL(p || q)
    M = 200_000
    x = torch.multinomial(p, M, replacement=True, generator=torch.Generator().manual_seed(100 + seed))
    lp, ref = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):  # unbiased: mean within 5 standard errors of the exact KL
        k = kl_estimate(lp, ref, kind)
        se = float(k.std()) / math.sqrt(M)
        assert abs(float(k.mean()) - kl) < 5 * se, (kind, float(k.mean()), kl, se)
    # k2 is biased: its MC mean matches its own exact expectation E_p[(log q/p)^2 / 2] ...
    k2 = kl_estimate(lp, ref, "k2")
    e_k2 = float((p * 0.5 * (q / p).log().square()).sum())
    assert abs(float(k2.mean()) - e_k2) < 5 * float(k2.std()) / math.sqrt(M)
    # ... which is close to the KL (they agree to second order in log r) but not equal to it
    assert abs(e_k2 - kl) < {1.0: 0.5, 0.3: 0.1, 0.1: 0.03}[scale] * kl
    # and k3 is the lower-variance unbiased one when q is close to p (Schulman 2020)
    if scale <= 0.3:
        assert float(kl_estimate(lp, ref, "k3").var()) < float(kl_estimate(lp, ref, "k1").var())


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.floats(-60, 60), st.floats(-60, 60))
def test_k3_and_k2_non_negative(a, b):
    lp = torch.tensor([[a, -abs(a) - 1e-3]], dtype=F64)
    ref = torch.tensor([[b, -abs(b)]], dtype=F64)
    for dtype in (F64, torch.float32):
        k3 = kl_estimate(lp.to(dtype), ref.to(dtype), "k3")
        assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert (kl_estimate(lp, ref, "k2") >= 0).all()


def test_in_loss_gradients_exact_expectation():
    """E_pi[grad k(x)] computed exactly by enumeration (x fixed, pi = softmax(theta)):
    k1 -> 0, k2 -> grad KL(pi || ref), k3 -> grad KL(ref || pi)."""
    g = torch.Generator().manual_seed(3)
    V = 7
    theta = torch.randn(V, generator=g, dtype=F64, requires_grad=True)
    ref_lp = torch.log_softmax(torch.randn(V, generator=g, dtype=F64), 0)

    def expected_grad(kind):
        lp = torch.log_softmax(theta, 0)
        w = lp.exp().detach()  # sampling weights, not differentiated
        (gr,) = torch.autograd.grad((w * kl_estimate(lp, ref_lp, kind)).sum(), theta)
        return gr

    lp = torch.log_softmax(theta, 0)
    (g_rev,) = torch.autograd.grad((lp.exp() * (lp - ref_lp)).sum(), theta)
    lp = torch.log_softmax(theta, 0)
    (g_fwd,) = torch.autograd.grad((ref_lp.exp() * (ref_lp - lp)).sum(), theta)
    assert g_rev.abs().sum() > 0.1 and (g_rev - g_fwd).abs().sum() > 0.1  # the two differ here
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(V, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(expected_grad("k2"), g_rev, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected_grad("k3"), g_fwd, rtol=1e-10, atol=1e-12)


def test_kl_gradcheck():
    g = torch.Generator().manual_seed(4)
    lp = (-torch.rand(2, 5, generator=g, dtype=F64) * 3).requires_grad_(True)
    ref = (-torch.rand(2, 5, generator=g, dtype=F64) * 3).requires_grad_(True)
    for kind in KL_KINDS:
        assert torch.autograd.gradcheck(lambda a, b: kl_estimate(a, b, kind), (lp, ref))


def test_entropy_fixture_and_gradcheck():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -1.0]]], dtype=F64)
    got = entropy_from_logits(logits)
    z = [1.0, 2.0, 3.0, -1.0]
    s = sum(math.exp(v) for v in z)
    p = [math.exp(v) / s for v in z]
    want = [math.log(4.0), -sum(pi * math.log(pi) for pi in p)]
    torch.testing.assert_close(got, torch.tensor([want], dtype=F64), rtol=0, atol=1e-14)
    # scale-safe: huge logits give a one-hot distribution, entropy 0, no NaN
    big = torch.tensor([[[1e4, 0.0, -1e4]]], dtype=torch.bfloat16)
    assert float(entropy_from_logits(big)) == pytest.approx(0.0, abs=1e-6)
    x = torch.randn(2, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    assert torch.autograd.gradcheck(entropy_from_logits, (x,))
