"""kernels/batch_invariant.py: the same rows give bitwise-identical outputs at batch sizes 1, 3,
64 and 200 (matmul, RMSNorm, attention: the interpreted Triton code on this CPU, compiled on a
GPU), a decode row equals the same row inside a prefill chunk, and the hypothesis property of
kernels/check.py (float64 reference within tolerance, invariance of every drawn case)."""

import pytest
import torch

from kernels import batch_invariant as bi
from kernels.check import batch_invariant_property, implementations

TRITON = [i for i in implementations() if i != "torch"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", TRITON)
def test_rows_are_bitwise_the_same_at_batch_sizes_1_3_64_200(impl):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 70, generator=g).to(DEVICE), torch.randn(45, 70, generator=g).to(DEVICE)
    norm_w = (torch.rand(70, generator=g) + 0.5).to(DEVICE)
    q = torch.randn(200, 1, 1, 16, generator=g).to(DEVICE)  # 200 sequences, one decode query each
    k, v = torch.randn(200, 1, 70, 16, generator=g).to(DEVICE), torch.randn(200, 1, 70, 16, generator=g).to(DEVICE)
    start = torch.randint(0, 70, (200,), generator=g).to(DEVICE)
    ops = {"matmul": lambda n: bi.matmul(x[:n], w, impl=impl),
           "rms_norm": lambda n: bi.rms_norm(x[:n] * 5, norm_w, 1e-6, impl=impl),
           "attention": lambda n: bi.attention(q[:n], k[:n], v[:n], start[:n], impl=impl)}
    for name, op in ops.items():
        outs = {n: op(n) for n in (1, 3, 64, 200)}
        for n, out in outs.items():
            assert torch.equal(out, outs[200][:n]), (name, n)
        want = {"matmul": lambda: bi.matmul_reference(x, w), "rms_norm": lambda: bi.rms_norm_reference(x * 5, norm_w, 1e-6),
                "attention": lambda: bi.attention_reference(q, k, v, start)}[name]()
        assert float((outs[200].double() - want).abs().max() / want.abs().max().clamp(min=1)) <= 1e-5, name


@pytest.mark.parametrize("impl", TRITON)
def test_a_decode_row_is_bitwise_the_row_of_a_prefill_chunk(impl):
    """The engine decodes position 149 alone; the trainer computes it in a chunk of 20 queries."""
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 2, 150, 24, generator=g).to(DEVICE), torch.randn(1, 2, 150, 24, generator=g).to(DEVICE)
    q = torch.randn(1, 4, 20, 24, generator=g).to(DEVICE)
    chunk = bi.attention(q, k, v, torch.tensor([130], device=DEVICE), impl=impl)
    alone = bi.attention(q[:, :, -1:], k, v, torch.tensor([149], device=DEVICE), impl=impl)
    assert torch.equal(chunk[:, :, -1:], alone)


@pytest.mark.parametrize("impl", implementations())
def test_batch_invariant_ops_property(impl):
    seen = batch_invariant_property(impl, max_examples=10)
    assert sum(n for n, _, _ in seen.values()) == 10


def test_gradients_flow_through_the_kernels():
    """Backward is ordinary torch (nothing needs it invariant): it equals the reference's."""
    impl = TRITON[0] if TRITON else "torch"
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 20, generator=g, device=DEVICE, requires_grad=True)
    w = torch.randn(7, 20, generator=g, device=DEVICE, requires_grad=True)
    (bi.matmul(x, w, impl=impl) * torch.arange(7.0, device=DEVICE)).sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (bi.matmul_reference(xr, wr) * torch.arange(7.0, device=DEVICE, dtype=torch.float64)).sum().backward()
    assert float((x.grad.double() - xr.grad).abs().max()) <= 1e-5 and float((w.grad.double() - wr.grad).abs().max()) <= 1e-5
