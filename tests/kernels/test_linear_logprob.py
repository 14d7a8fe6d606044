"""kernels/linear_logprob.py against its float64 reference: log-probs, entropies and both
gradients, on every implementation this machine has (the torch path; the Triton code under the
interpreter on a CPU, compiled on a GPU). The property (drawn shapes with N = 1, odd sizes and
vocabularies no multiple of a block; fp32 and fp16; temperatures; large-magnitude logits; ignored
rows) lives in kernels/check.py, which ``python -m kernels.check`` runs with a larger budget.

Tolerance: the largest absolute error over the largest reference magnitude (floored at 1),
fp32 <= 1e-5, fp16 <= 1e-2 (the inputs round to fp16; accumulators are fp32 in every path).
"""

import pytest
import torch

from kernels.check import TOL, implementations, linear_logprob_errors, linear_logprob_property, rel_err
from kernels.linear_logprob import linear_logprob, linear_logprob_reference


@pytest.mark.parametrize("impl", implementations())
def test_forward_and_gradients_equal_the_float64_reference(impl):
    seen = linear_logprob_property(impl, max_examples=12)
    assert sum(n for n, _, _ in seen.values()) == 12


def test_a_bad_kernel_fails_the_property(monkeypatch):
    """The property can fail: an entropy off by 1e-4 is caught (fp32 tolerance 1e-5)."""
    import kernels.linear_logprob as llp

    real = llp._torch_forward

    def off(*args):
        lp, ent, m, log_s = real(*args)
        return lp, ent + 1e-4, m, log_s

    monkeypatch.setattr(llp, "_torch_forward", off)
    errs = linear_logprob_errors("torch", 9, 50, 16, torch.float32, 1.0, 3.0, 0.0, seed=1)
    assert 1.0 < errs["entropy"] <= 10.0  # 1e-4 over the largest entropy (> 1): beyond what fp32 allows
    assert TOL[torch.float32] < errs["entropy error"] <= 1e-4 and errs["log-prob"] <= 1.0


@pytest.mark.parametrize("impl", implementations())
def test_many_vocabulary_chunks_and_an_extreme_row(impl, monkeypatch):
    """Vocabularies spanning several chunks of the backward and tiles of the forward, one row
    whose target logit is ~1e4 (its distribution is one token: entropy ~0, log-prob ~0), float32."""
    import kernels.linear_logprob as llp

    monkeypatch.setattr(llp, "TORCH_COLS", 64)
    monkeypatch.setattr(llp, "TORCH_TILE", 64 * 8)
    monkeypatch.setattr(llp, "GRAD_BUFFER", 64 * 3 * 40)  # 3 column blocks per backward chunk
    device = "cuda" if impl == "triton" else "cpu"
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(40, 24, generator=g) * 0.6, torch.randn(517, 24, generator=g)
    targets = torch.randint(0, 517, (40,), generator=g)
    targets[[2, 11]] = -100
    h[5] = w[targets[5]] * 300.0 / float(w[targets[5]].norm()) ** 2 * 30.0
    g_lp, g_ent = torch.randn(40, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    ref_h, ref_w = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = linear_logprob_reference(ref_h, ref_w, targets, 0.9)
    (lp_ref * g_lp + ent_ref * g_ent).sum().backward()
    x, y = h.to(device).requires_grad_(), w.to(device).requires_grad_()
    lp, ent = linear_logprob(x, y, targets.to(device), 0.9, impl=impl)
    (lp * g_lp.to(device, lp.dtype) + ent * g_ent.to(device, lp.dtype)).sum().backward()
    for name, a, b in (("log-prob", lp, lp_ref), ("entropy", ent, ent_ref), ("dh", x.grad, ref_h.grad),
                       ("dW", y.grad, ref_w.grad)):
        assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
    assert float(lp_ref[5]) > -1e-6 and abs(float(ent[5])) < 1e-5 and abs(float(lp[5])) < 1e-5  # one token
    assert lp[2] == 0 and lp[11] == 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"h \(3, 4\), w \(5, 3\)"):
        linear_logprob(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))


def test_the_triton_code_runs_here():
    """The CI suite exercises the Triton code itself (interpreted on a CPU), not only torch."""
    assert implementations() == ["torch", "triton" if torch.cuda.is_available() else "interpret"]
