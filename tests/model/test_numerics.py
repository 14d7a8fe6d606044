"""The batch-invariant ops of numerics = "exact" (sidpt/model/numerics.py): each equals its float64
reference to float32 rounding, and a row's result does not depend on the rows it is batched with.

Tolerances: float32 results against float64 references to 2e-5 relative (a few float32 ulps over
reductions of <= 1000 terms); invariance is bitwise (torch.equal)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sidpt.model import numerics
from sidpt.model.model import ModelArgs, build_model


def ref_attention(q, k, v, visible):
    """float64 softmax attention with GQA (head h reads KV head h // G)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~visible, float("-inf"))
    return torch.softmax(s, -1) @ v


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), KV=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]), Tq=st.integers(1, 9),
       L=st.integers(1, 150), seed=st.integers(0, 2**16))
def test_attention_matches_float64_reference_and_is_row_invariant(B, KV, G, Tq, L, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, KV * G, Tq, 16, generator=g)
    k, v = torch.randn(B, KV, L, 16, generator=g), torch.randn(B, KV, L, 16, generator=g)
    vis = torch.rand(B, 1, Tq, L, generator=g) < 0.6
    vis[..., 0] = True
    out = numerics.attention(q, k, v, vis)
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, vis), rtol=2e-5, atol=2e-5)
    # one query alone, with only the keys up to its last visible one: bitwise the batched result
    b, t = B - 1, Tq // 2
    last = int(vis[b, 0, t].nonzero().max()) + 1
    alone = numerics.attention(q[b:b + 1, :, t:t + 1], k[b:b + 1, :, :last], v[b:b + 1, :, :last],
                               vis[b:b + 1, :, t:t + 1, :last])
    assert torch.equal(alone, out[b:b + 1, :, t:t + 1])


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 300), K=st.sampled_from([16, 64, 96]), N=st.sampled_from([8, 80, 512]),
       left=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_reference_and_rows_do_not_depend_on_the_batch(M, K, N, left, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.1, torch.randn(N, generator=g)
    saved = numerics.WEIGHT_LEFT_MIN
    numerics.WEIGHT_LEFT_MIN = 0 if left else 1 << 40  # both operand orders
    try:
        y = numerics.linear(x, w, b)
        i = M // 3
        alone = numerics.linear(x[i:i + 1], w, b)[0]
    finally:
        numerics.WEIGHT_LEFT_MIN = saved
    torch.testing.assert_close(y.double(), x.double() @ w.double().t() + b.double(), rtol=2e-5, atol=2e-5)
    assert torch.equal(alone, y[i])


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 200), V=st.sampled_from([7, 64, 1000]), seed=st.integers(0, 2**16))
def test_log_softmax_and_token_logprobs(M, V, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, V, generator=g) * 4
    t = torch.randint(0, V, (M,), generator=g)
    lp = numerics.token_logprobs(x, t)
    ref = torch.log_softmax(x.double(), -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), ref, rtol=2e-5, atol=2e-5)
    assert torch.equal(numerics.log_softmax(x).gather(1, t[:, None])[:, 0], lp)  # the engine's = the trainer's
    i = M // 2
    assert torch.equal(numerics.token_logprobs(x[i:i + 1], t[i:i + 1])[0], lp[i])


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70000), seed=st.integers(0, 2**16))
def test_elementwise_transcendentals_do_not_depend_on_the_tensor_size(n, seed):
    """SiLU and exp of an element are the same whether it sits in a vector body or would have
    been in a scalar tail (the whole tensor against the element alone)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    i = int(torch.randint(0, n, (1,), generator=g))
    for fn, ref in ((numerics.silu, lambda t: t.double() * torch.sigmoid(t.double())), (numerics.exp, None)):
        y = fn(x)
        assert torch.equal(fn(x[i:i + 1])[0], y[i])
        if ref is not None:
            torch.testing.assert_close(y.double(), ref(x), rtol=2e-6, atol=1e-7)


def test_rms_norm_matches_reference_and_swiglu_both_layouts(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 64, generator=g) * 2, torch.rand(64, generator=g) + 0.5
    y = numerics.rms_norm(x, w, 1e-6)
    xd = x.double()
    torch.testing.assert_close(y.double(), xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double(),
                               rtol=2e-6, atol=1e-6)
    assert torch.equal(numerics.rms_norm(x[5:6], w, 1e-6)[0], y[5])
    wgu, wd = torch.randn(96, 64, generator=g) * 0.1, torch.randn(64, 48, generator=g) * 0.1
    gate, up = (xd @ wgu.double().t()).chunk(2, -1)
    ref = (F.silu(gate) * up) @ wd.double().t()
    for threshold in (0, 1 << 40):  # feature-major (weight-left) and row-major
        monkeypatch.setattr(numerics, "WEIGHT_LEFT_MIN", threshold)
        out = numerics.swiglu(x, wgu, wd)
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
        assert torch.equal(numerics.swiglu(x[9:10], wgu, wd)[0], out[9])


def test_exact_model_matches_the_default_model_to_rounding():
    args = ModelArgs(vocab_size=97)
    a, b = build_model(args, seed=2), build_model(args, seed=2).set_numerics("exact")
    tok = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(b(tok), a(tok), rtol=1e-4, atol=1e-4)
    numerics.check_invariance(b)  # this machine: the exact ops are batch-invariant


def test_check_invariance_names_a_weight_that_is_not(monkeypatch):
    """A product whose rounding depends on its row count is caught, naming the weight."""
    model = build_model(ModelArgs(vocab_size=97), seed=0).set_numerics("exact")
    exact_linear = numerics.linear

    def by_row_count(x, w, b=None):  # what an unpadded BLAS does: another result at another M
        y = exact_linear(x, w, b)
        return y * (1 + 1e-6 * (x.reshape(-1, x.shape[-1]).shape[0] > 3))

    monkeypatch.setattr(numerics, "linear", by_row_count)
    with pytest.raises(numerics.NumericsError, match=r"the matmul of \S+ \(\d+, \d+\) is not batch-invariant"):
        numerics.check_invariance(model)


def test_attention_gradients_equal_sdpa_in_float64():
    """The running max is detached (a stabiliser the output does not depend on): the gradients
    are still those of softmax attention, here against SDPA's to 1e-12 in float64, over two key
    blocks and GQA."""
    g = torch.Generator().manual_seed(0)
    T = numerics.KEY_BLOCK + 9
    q, k, v = (torch.randn(2, h, T, 16, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    w = torch.randn(2, 4, T, 16, generator=g, dtype=torch.float64)
    (numerics.dense_causal_attention(0, q, k, v) * w).sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * w).sum().backward()
    for a, t in zip(ours, (q, k, v)):
        torch.testing.assert_close(a, t.grad, rtol=1e-12, atol=1e-12)
