"""The engine's weight-left matmuls are the same products as F.linear (float64 reference)."""

import dataclasses

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sidpt.model import SIZES, build_model
from sidpt.model.model import weight_left_linear


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


def test_weight_left_model_logits_match_linear_model():
    """A whole Qwen2-family forward (qkv bias, the feature-major MLP, the tied LM head):
    weight-left equals the F.linear model to float32 rounding, and the float64 model to 1e-12."""
    args = dataclasses.replace(SIZES["1M"], family="qwen2", qkv_bias=True)
    tokens = torch.randint(0, args.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-12)):
        model = build_model(args, dtype=dtype, seed=2).requires_grad_(False)
        ref = model(tokens)
        got = model.set_weight_left(True)(tokens)
        model.set_weight_left(False)
        assert float(ref.abs().max()) > 0.1
        assert float((got - ref).abs().max()) <= tol
