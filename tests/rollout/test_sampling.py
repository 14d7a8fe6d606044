"""Sampling: empirical distributions match the stated ones (chi-square, fixed seeds)."""

import math

import pytest
import torch

from sidpt.rollout.sampling import SamplingParams, sample, truncated_logprobs, uniform

N = 40_000  # draws per distribution


def chi2_threshold(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum().item()
    return stat, int(support.sum()) - 1


def reference_q(logits: torch.Tensor, T: float, k: int, p: float) -> torch.Tensor:
    """The truncated, renormalised distribution, by hand in float64."""
    probs = torch.softmax(logits.double() / T, -1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    keep, mass = [], 0.0
    for rank, i in enumerate(order):
        if k and rank >= k:
            break
        if mass >= p:
            break
        keep.append(i)
        mass += probs[i].item()
    q = torch.zeros_like(probs)
    q[keep] = probs[keep] / probs[keep].sum()
    return q


LOGITS = torch.tensor([2.0, -1.0, 0.5, 1.5, -3.0, 0.0, 1.0, -0.5, 2.5, -2.0, 0.25, 0.75])


@pytest.mark.parametrize("T, k, p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (0.9, 6, 0.9)])
def test_empirical_distribution_matches(T, k, p):
    B = N
    logits = LOGITS.expand(B, -1)
    u = uniform(torch.full((B,), 12345), torch.arange(B))
    tok, lp = sample(logits, torch.full((B,), T), torch.full((B,), k), torch.full((B,), p), u)
    q = reference_q(LOGITS, T, k, p)
    counts = torch.bincount(tok, minlength=len(LOGITS)).double()
    assert counts[q == 0].sum() == 0  # nothing drawn off the support
    stat, df = chi2(counts, q)
    assert stat < chi2_threshold(df), (stat, df)
    torch.testing.assert_close(lp.double(), q.log()[tok], atol=1e-6, rtol=0)  # the reported log q


def test_logq_without_truncation_is_log_softmax_over_T():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1)) * 3
    T = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.9])
    got = truncated_logprobs(logits, T, torch.zeros(5, dtype=torch.long), torch.ones(5))
    ref = torch.log_softmax(logits.double() / T[:, None].double(), -1)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)  # float32 resolution


def test_rows_with_different_params_in_one_batch():
    """Each row follows its own parameters (mixed batch equals rows sampled alone)."""
    B = 6
    logits = torch.randn(B, 30, generator=torch.Generator().manual_seed(2)) * 2
    T = torch.tensor([0.0, 1.0, 0.5, 1.0, 2.0, 0.8])
    k = torch.tensor([0, 5, 0, 0, 3, 10])
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 0.95])
    u = uniform(torch.arange(B) + 7, torch.full((B,), 3))
    tok, lp = sample(logits, T, k, p, u)
    for i in range(B):
        t1, l1 = sample(logits[i: i + 1], T[i: i + 1], k[i: i + 1], p[i: i + 1], u[i: i + 1])
        assert t1.item() == tok[i].item() and l1.item() == pytest.approx(lp[i].item(), abs=1e-6)
    assert tok[0] == logits[0].argmax()  # greedy row
    assert lp[0].item() == pytest.approx(torch.log_softmax(logits[0].double(), -1).max().item(), abs=1e-6)


def test_uniform_is_uniform_and_seed_dependent():
    u = uniform(torch.full((200_000,), 3), torch.arange(200_000))
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1).double()
    stat, df = chi2(counts, torch.full((20,), 1 / 20, dtype=torch.float64))
    assert stat < chi2_threshold(df)
    # consecutive draws are uncorrelated; different seeds give different streams
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01
    v = uniform(torch.full((1000,), 4), torch.arange(1000))
    assert (u[:1000] != v).all()


def test_bad_params_raise():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
