"""The packed trainer forward (sidpt.packing) equals the right-padded one, values and gradients.

float64 reference: ``sequence_logprobs`` on the padded rows, to 1e-12, over random layouts
(hypothesis: group sizes, prompt and sequence lengths, rows of a group whose prompts differ,
targets inside the prompt); the flat length is the closed form (each shared prompt once, every
remainder); and a Trainer's update with ``pack`` equals the one without."""

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from sidpt.batch import GROUP_ID, LOSS_MASK, PROMPT_LEN, REWARD, ROLLOUT_LOGPROBS, SEQ_LEN, TOKENS
from sidpt.model import SIZES, build_model
from sidpt.packing import build_packing, packed_logprobs, units
from sidpt.rl import apply_correction, compute_advantages
from sidpt.trainer import OptimConfig, Trainer, sequence_logprobs

ARGS = dataclasses.replace(SIZES["1M"], vocab_size=61, family="qwen2", qkv_bias=True)  # GQA: 4 heads, 2 KV
MODEL64 = build_model(ARGS, dtype=torch.float64, seed=1)


@st.composite
def layouts(draw):
    """Rows of groups: each group one prompt (its rows may differ from it), ragged remainders."""
    n_groups = draw(st.integers(1, 3))
    rows = []
    for g in range(n_groups):
        P = draw(st.integers(1, 6))
        for _ in range(draw(st.integers(1, 4))):
            rows.append((g, P, draw(st.integers(0, 7)), draw(st.booleans()) and draw(st.booleans())))
    return rows, draw(st.integers(0, 2**16))


def make(rows, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(rows)
    T = max(P + L for _, P, L, _ in rows) + 1
    tokens = torch.randint(0, ARGS.vocab_size, (n, T), generator=g)
    prompts = {}
    for i, (grp, P, L, own) in enumerate(rows):
        base = prompts.setdefault(grp, tokens[i, :P].clone())
        if not own:
            tokens[i, :P] = base  # the group's prompt; ``own``: a prompt of its own in the same group
    prompt_len = torch.tensor([P for _, P, _, _ in rows])
    seq_len = torch.tensor([P + L for _, P, L, _ in rows])
    pos = torch.arange(T)[None]
    mask = (pos >= prompt_len[:, None]) & (pos < seq_len[:, None])
    mask |= (torch.rand(n, T, generator=g) < 0.2) & (pos < seq_len[:, None])  # some prompt-position targets
    return tokens, seq_len, prompt_len, torch.tensor([grp for grp, _, _, _ in rows]), mask


@settings(max_examples=25, deadline=None)
@given(layouts())
def test_packed_logprobs_equal_padded_float64(layout):
    rows, seed = layout
    tokens, seq_len, prompt_len, group, mask = make(rows, seed)
    lp, ent = sequence_logprobs(MODEL64, tokens, entropy=True, mask=mask)
    plp, pent, _ = packed_logprobs(MODEL64, tokens, seq_len, prompt_len, group, mask, entropy=True)
    assert float((lp - plp).detach().abs().max()) <= 1e-12 and float((ent - pent).detach().abs().max()) <= 1e-12
    params = list(MODEL64.parameters())
    g_pad = torch.autograd.grad((lp * 0.7 + ent * 0.3).sum(), params, allow_unused=True)
    g_pack = torch.autograd.grad((plp * 0.7 + pent * 0.3).sum(), params, allow_unused=True)
    for a, b in zip(g_pad, g_pack):
        if a is not None:
            assert float((a - b).abs().max()) <= 1e-11


def test_flat_length_is_each_shared_prompt_once():
    rows = [(0, 5, 3, False), (0, 5, 6, False), (0, 5, 0, False), (1, 4, 2, False), (1, 4, 5, True), (2, 3, 4, False)]
    tokens, seq_len, prompt_len, group, _ = make(rows, 0)
    assert units(tokens, prompt_len, group) == [[0, 1, 2], [3], [4], [5]]  # row 4: its own prompt
    pk = build_packing(tokens, seq_len, prompt_len, group)
    # prompts 5 + 4 + 4 + 3 once, remainders 3 + 6 + 0 + 2 + 5 + 4; padded: 6 rows x 11
    assert pk.tokens.shape == (1, 16 + 20)
    assert torch.equal(pk.tokens[0, :8], torch.cat((tokens[0, :5], tokens[0, 5:8])))
    assert pk.positions[0, 5:8].tolist() == [5, 6, 7]


def batch64() -> TensorDict:
    rows = [(0, 6, 9, False)] * 2 + [(0, 6, 4, False)] * 2 + [(1, 4, 11, False)] * 3 + [(1, 4, 2, False)]
    tokens, seq_len, prompt_len, group, _ = make(rows, 3)
    pos = torch.arange(tokens.shape[1])[None]
    mask = (pos >= prompt_len[:, None]) & (pos < seq_len[:, None])
    b = TensorDict({TOKENS: tokens, SEQ_LEN: seq_len, PROMPT_LEN: prompt_len, GROUP_ID: group, LOSS_MASK: mask,
                    REWARD: torch.tensor([1., 0., 0., 1., 0., 1., 1., 0.])}, batch_size=[8])
    with torch.no_grad():
        lp, _ = sequence_logprobs(MODEL64, tokens, mask=mask)
    b[ROLLOUT_LOGPROBS] = torch.where(mask, lp - 0.05, 0.0)
    return compute_advantages(b, "grpo")


def test_trainer_update_with_packing_equals_padded_float64():
    out = []
    for pack in (False, True):
        t = Trainer(build_model(ARGS, dtype=torch.float64, seed=1), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1e9, 60, pack))
        part, _ = apply_correction(t.recompute(batch64()), "token-tis")
        stats = t.rl_step(part, agg="token-mean", loss="ppo", loss_kwargs={}, kl_coef=0.0, entropy_coef=0.0,
                          mini_batches=2)
        out.append((stats, part, dict(t.model.named_parameters())))
    (s0, p0, w0), (s1, p1, w1) = out
    # two mini-batches of 4 rows: padded 4 x 15 each; packed 6 + 9 + 9 + 4 + 4 and 4 + 3 x 11 + 2
    assert s0["train/forward_tokens"] == 120 and s1["train/forward_tokens"] == 32 + 39
    assert s0["train/seq_tokens"] == s1["train/seq_tokens"] == 4 * 6 + 26 + 4 * 4 + 35
    assert s0["train/grad_norm"] > 1e-3 and abs(s0["train/grad_norm"] - s1["train/grad_norm"]) <= 1e-12
    assert float((p0["old_logprobs"] - p1["old_logprobs"]).abs().max()) <= 1e-12
    with torch.no_grad():
        assert max(float((w0[k] - w1[k]).abs().max()) for k in w0) <= 1e-10  # Adam divides by sqrt(v): ~100x
