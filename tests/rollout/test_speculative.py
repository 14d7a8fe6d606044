"""Speculative on-policy rollouts: the tokens follow the exact policy, whatever the draft proposes.

A 6-token vocabulary model, an fp8 draft (far from the target: about a fifth of its proposals are
rejected here), 2 new tokens: the empirical joint distribution of (x1, x2) over 4000 requests
is compared with p(x1) p(x2 | x1) of the exact float32 policy by a chi-square test at
significance 1e-3 (35 degrees of freedom: critical value 66.6); the draft's own distribution
fails the same test (so the test can tell them apart). The behaviour log-probs are the trainer's
recompute, bitwise."""

import torch

from sidpt.model import build_model
from sidpt.model.model import ModelArgs
from sidpt.rollout import Request, SamplingParams
from sidpt.rollout.speculative import SpeculativeEngine
from sidpt.trainer import sequence_logprobs

V, N, PROMPT = 6, 4000, [1, 2, 3]
CRITICAL_35DOF_1E3 = 66.62


def model():
    m = build_model(ModelArgs(vocab_size=V, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=64))
    m.init_weights(seed=3, std=0.5)  # sharp next-token distributions
    return m.set_numerics("exact")


def joint(m, prompt):
    """p(x1, x2) [V, V] of ``m`` after ``prompt``."""
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt]))[0, -1].double(), -1)
        seqs = torch.tensor([prompt + [a] for a in range(V)])
        p2 = torch.softmax(m(seqs)[:, -1].double(), -1)  # [V, V]
    return p1[:, None] * p2


def chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_speculative_tokens_follow_the_exact_policy():
    target = model()
    eng = SpeculativeEngine(target, k=2, draft_precision="emulated-fp8", max_model_len=16)
    outs = eng.generate([Request(i, PROMPT, SamplingParams(max_new_tokens=2, seed=i)) for i in range(N)])
    counts = torch.zeros(V, V, dtype=torch.float64)
    for o in outs:
        counts[o.tokens[3], o.tokens[4]] += 1
    rate = eng.stats["accepted"] / eng.stats["drafted"]
    assert 0.5 < rate < 0.95, eng.stats  # the draft is wrong often enough to exercise the residual draws
    assert chi2(counts, joint(target, PROMPT)) < CRITICAL_35DOF_1E3
    assert chi2(counts, joint(eng.draft, PROMPT)) > CRITICAL_35DOF_1E3  # the draft's distribution is told apart
    tok = torch.tensor([o.tokens for o in outs[:300]])
    with torch.no_grad():
        lp, _ = sequence_logprobs(target, tok)
    mu = torch.tensor([o.logprobs for o in outs[:300]])
    assert torch.equal(lp[:, 3:], mu[:, 3:])  # behaviour log-probs = the trainer's, bitwise


def test_speculative_greedy_is_the_targets_greedy_and_refuses_tools():
    target = model()
    eng = SpeculativeEngine(target, k=3, draft_precision="emulated-fp8", max_model_len=16)
    got = eng.generate([Request("g", PROMPT, SamplingParams(temperature=0.0, max_new_tokens=8))])[0]
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(target(torch.tensor([seq]))[0, -1].argmax()))
    assert got.tokens == seq
    try:
        eng.submit(Request("t", PROMPT, SamplingParams(stop_strings=("x",))))
    except ValueError as e:
        assert "single-turn" in str(e)
    else:
        raise AssertionError("a multi-turn request was accepted")


def test_a_tool_calling_environment_is_refused_at_start_up():
    from pathlib import Path
    from types import SimpleNamespace

    import pytest

    from sidpt.config import ConfigError, load_config
    from sidpt.controller import check_speculative

    cfg = load_config(Path(__file__).parents[2] / "configs" / "debug.toml",
                      ["--model.numerics=exact", "--rollout.speculative=2"])
    with pytest.raises(ConfigError, match=r"rollout.speculative=2: .* env 'search' calls tools"):
        check_speculative(cfg, SimpleNamespace(env=SimpleNamespace(stop_strings=("</search>",))))
    check_speculative(cfg, SimpleNamespace(env=SimpleNamespace(stop_strings=())))  # single-turn: fine
