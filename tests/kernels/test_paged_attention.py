"""kernels/paged_attention.py against its float64 reference (the hypothesis property of
kernels/check.py: scattered blocks, GQA, odd head sizes, one key to several blocks), and the
engine with the kernel against the engine without it (the interpreted Triton code on this CPU):
the same greedy tokens, log-probs within 1e-5."""

import pytest

from kernels.check import implementations, paged_attention_property
from sidpt.model import ModelArgs, build_model
from sidpt.rollout import Engine, EngineConfig, Request, SamplingParams


@pytest.mark.parametrize("impl", implementations())
def test_paged_decode_attention_equals_the_float64_reference(impl):
    seen = paged_attention_property(impl, max_examples=15)
    assert sum(n for n, _, _ in seen.values()) == 15


@pytest.mark.parametrize("static", [False, True])
def test_the_engine_decodes_the_same_through_the_kernel(static, monkeypatch):
    import kernels.paged_attention as pa

    calls = []
    real = pa._paged_decode_kernel
    monkeypatch.setattr(pa, "_paged_decode_kernel", type("Counted", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), real[grid])[1]})())
    args = ModelArgs(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64)
    model = build_model(args, seed=3)
    outs = []
    for kernel in (False, True):
        e = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=64, static_decode=static,
                                       paged_kernel=kernel))
        assert e.paged_kernel is kernel
        reqs = [Request(i, list(range(1 + i, 4 + 3 * i)), SamplingParams(temperature=t, max_new_tokens=9, seed=i))
                for i, t in enumerate((0.0, 1.0, 0.0))]
        outs.append(e.generate(reqs))
    assert len(calls) >= 2 * 8  # every decode step of both layers ran the Triton code
    for a, b in zip(*outs):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5
