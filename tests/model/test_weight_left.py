"""The engine's weight-left matmuls are the same products as F.linear (float64 reference)."""

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sidpt.model import SIZES, build_model
import sidpt.model.model as mm
from sidpt.model.model import use_weight_left, weight_left_linear


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), k=st.integers(1, 70), n=st.integers(1, 70),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_left_linear_equals_float64_linear(lead, k, n, bias, seed):
    """Within 1e-5 relative to the operands' scale (float32 rounding of a K-term dot product),
    row-major output of the input's leading shape."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got = weight_left_linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (*lead, n) and got.is_contiguous()
    scale = float((x.double().abs() @ w.double().abs().t()).max()) + (0.0 if b is None else float(b.abs().max()))
    assert float((got.double() - ref).abs().max()) <= 1e-6 * scale * max(1.0, k ** 0.5)


def test_weight_left_model_logits_match_linear_model(monkeypatch):
    """A whole Qwen2-family forward (qkv bias, the feature-major MLP, the tied LM head):
    weight-left equals the F.linear model to float32 rounding, and the float64 model to 1e-12.
    (The size rule is lowered so that the 1M model's small weights take the path.)"""
    monkeypatch.setattr(mm, "WEIGHT_LEFT_MIN", 0)
    calls = []
    monkeypatch.setattr(mm, "weight_left_linear", lambda *a: calls.append(1) or weight_left_linear(*a))
    args = dataclasses.replace(SIZES["1M"], family="qwen2", qkv_bias=True)
    tokens = torch.randint(0, args.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-12)):
        model = build_model(args, dtype=dtype, seed=2).requires_grad_(False)
        ref = model(tokens)
        got = model.set_weight_left(True)(tokens)
        model.set_weight_left(False)
        assert len(calls) == 2 * args.n_layers + 1  # qkv and o per layer, the LM head (the MLP: its own path)
        calls.clear()
        assert float(ref.abs().max()) > 0.1
        assert float((got - ref).abs().max()) <= tol


def test_weight_left_is_taken_for_few_rows_of_a_big_weight_only():
    big, small = torch.empty(1024, 512), torch.empty(256, 128)
    assert use_weight_left(torch.empty(16, 1, 512), big) and use_weight_left(torch.empty(64, 512), big)
    assert not use_weight_left(torch.empty(1, 1, 512), big)  # one row: a GEMV, F.linear is as fast
    assert not use_weight_left(torch.empty(4, 65, 512), big)  # a prefill
    assert not use_weight_left(torch.empty(16, 128), small)  # in cache
