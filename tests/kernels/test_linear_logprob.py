"""kernels/linear_logprob.py against its float64 reference: log-probs, entropies and both
gradients, on every implementation this machine has (the torch path; the Triton code under the
interpreter on a CPU, compiled on a GPU), for drawn shapes (N = 1, odd sizes, vocabularies that
are no multiple of a block), dtypes, temperatures, large-magnitude logits and ignored rows.

Tolerance: the largest absolute error over the largest reference magnitude (floored at 1),
fp32 <= 1e-5, fp16 <= 1e-2 (the inputs round to fp16; accumulators are fp32 in every path).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import backend
from kernels.linear_logprob import IGNORE, linear_logprob, linear_logprob_reference

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
IMPLS = ["torch"] + ([backend(torch.device("cuda"))] if torch.cuda.is_available() else
                     (["interpret"] if backend(torch.device("cpu")) == "interpret" else []))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0))


def case(N, V, D, dtype, temperature, scale, ignored, seed, device="cpu"):
    """Inputs, the op's outputs and gradients, and the reference's, for upstream gradients g."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * scale / D**0.5).to(dtype)
    w = torch.randn(V, D, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = IGNORE
    g_lp, g_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    ref_h, ref_w = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = linear_logprob_reference(ref_h, ref_w, targets, temperature)
    (lp_ref * g_lp + ent_ref * g_ent).sum().backward()
    return h, w, targets, g_lp, g_ent, (lp_ref.detach(), ent_ref.detach(), ref_h.grad, ref_w.grad)


def run(impl, h, w, targets, g_lp, g_ent, temperature, device="cpu"):
    h = h.to(device).requires_grad_()
    w = w.to(device).requires_grad_()
    lp, ent = linear_logprob(h, w, targets.to(device), temperature, impl=impl)
    (lp * g_lp.to(device, lp.dtype) + ent * g_ent.to(device, lp.dtype)).sum().backward()
    return [x.detach().cpu() for x in (lp, ent, h.grad, w.grad)]


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=12, deadline=None)
@given(N=st.integers(1, 40), V=st.integers(1, 200), D=st.integers(1, 48), dtype=st.sampled_from(list(TOL)),
       temperature=st.floats(0.3, 2.0), scale=st.sampled_from([0.1, 3.0, 40.0]), ignored=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**31 - 1))
def test_forward_and_gradients_equal_the_float64_reference(impl, N, V, D, dtype, temperature, scale, ignored, seed):
    device = "cuda" if impl == "triton" else "cpu"
    h, w, targets, g_lp, g_ent, want = case(N, V, D, dtype, temperature, scale, ignored, seed)
    got = run(impl, h, w, targets, g_lp, g_ent, temperature, device)
    for name, a, b in zip(("log-prob", "entropy", "dh", "dW"), got, want):
        assert rel_err(a, b) <= TOL[dtype], (name, rel_err(a, b), impl, N, V, D, dtype)
    assert (got[0][targets == IGNORE] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_many_vocabulary_chunks_and_an_extreme_row(impl, monkeypatch):
    """Vocabularies spanning several chunks of the backward and tiles of the forward, one row
    whose logits reach 1e4 (its distribution is one token: entropy ~0, log-prob ~0), float32."""
    import kernels.linear_logprob as llp

    monkeypatch.setattr(llp, "TORCH_COLS", 64)
    monkeypatch.setattr(llp, "TORCH_TILE", 64 * 8)
    monkeypatch.setattr(llp, "GRAD_BUFFER", 64 * 3 * 40)  # 3 columns-blocks per backward chunk
    device = "cuda" if impl == "triton" else "cpu"
    h, w, targets, g_lp, g_ent, _ = case(40, 517, 24, torch.float32, 0.9, 3.0, 0.2, seed=7)
    h[5] = w[targets[5].clamp(min=0)] * 300.0  # z ~ 300 |w|^2 ~ 1e4 for the target
    targets[5] = targets[5].clamp(min=0)
    ref_h, ref_w = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = linear_logprob_reference(ref_h, ref_w, targets, 0.9)
    (lp_ref * g_lp + ent_ref * g_ent).sum().backward()
    got = run(impl, h, w, targets, g_lp, g_ent, 0.9, device)
    for name, a, b in zip(("log-prob", "entropy", "dh", "dW"), got, (lp_ref, ent_ref, ref_h.grad, ref_w.grad)):
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
    assert abs(float(got[1][5])) < 1e-5 and abs(float(got[0][5])) < 1e-5  # one token, no cancellation


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"h \(3, 4\), w \(5, 3\)"):
        linear_logprob(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))


def test_interpreter_is_used_on_this_cpu():
    """The CI suite exercises the Triton code itself, not only the torch path."""
    if torch.cuda.is_available():
        pytest.skip("a GPU: the compiled kernel runs instead")
    assert IMPLS == ["torch", "interpret"]
