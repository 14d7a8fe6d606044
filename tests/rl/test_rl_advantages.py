"""Advantage estimators against closed forms and brute-force float64 loops."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from sidpt.batch import ADVANTAGES, GROUP_ID, LOSS_MASK, OLD_LOGPROBS, REF_LOGPROBS, REWARD, VALUES
from sidpt.rl.advantages import (
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    dynamic_sampling,
    dynamic_sampling_filter,
    gae_advantages,
    grpo_advantages,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_to_token_reward,
)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# groups given as (id, rewards); ids are deliberately not contiguous nor sorted
groups = st.lists(
    st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=1, max_size=5),
    min_size=1,
    max_size=5,
)


def flatten(gs):
    rewards, ids = [], []
    for g, rs in enumerate(gs):
        rewards += rs
        ids += [100 - 7 * g] * len(rs)
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids)


# --- closed-form fixture: rewards [1, 0, 0 | 0.5, 1.5 | 2], group ids [7, 7, 7, 3, 3, 9] --------

REWARD_FIX = torch.tensor([1.0, 0.0, 0.0, 0.5, 1.5, 2.0], dtype=torch.float64)
GID_FIX = torch.tensor([7, 7, 7, 3, 3, 9])


def test_grpo_fixture():
    eps = 1e-6
    m7, s7 = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std
    m3, s3 = 1.0, math.sqrt((0.25 + 0.25) / 1)
    want = [
        (1 - m7) / (s7 + eps),
        (0 - m7) / (s7 + eps),
        (0 - m7) / (s7 + eps),
        (0.5 - m3) / (s3 + eps),
        (1.5 - m3) / (s3 + eps),
        0.0,
    ]
    got = grpo_advantages(REWARD_FIX, GID_FIX)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    want_dr = [2 / 3, -1 / 3, -1 / 3, -0.5, 0.5, 0.0]
    torch.testing.assert_close(
        dr_grpo_advantages(REWARD_FIX, GID_FIX),
        torch.tensor(want_dr, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


def test_rloo_fixture():
    want = [1 - 0.0, 0 - 0.5, 0 - 0.5, 0.5 - 1.5, 1.5 - 0.5, 0.0]  # group of one: no baseline, 0
    torch.testing.assert_close(rloo_advantages(REWARD_FIX, GID_FIX), torch.tensor(want, dtype=torch.float64))


@SETTINGS
@given(groups)
def test_grpo_zero_mean_per_group(gs):
    reward, gid = flatten(gs)
    assume(reward.abs().sum() > 0)
    for norm_std in (True, False):
        adv = grpo_advantages(reward, gid, norm_std=norm_std)
        for g in gid.unique():
            sel = adv[gid == g]
            assert abs(float(sel.sum())) <= 1e-9 * max(1.0, float(sel.abs().sum()))
        if not norm_std:  # Dr. GRPO is exactly r - group mean
            for i in range(len(reward)):
                same = reward[gid == gid[i]]
                assert abs(float(adv[i]) - (float(reward[i]) - sum(same.tolist()) / len(same))) < 1e-12


@SETTINGS
@given(groups)
def test_rloo_brute_force(gs):
    reward, gid = flatten(gs)
    assume(reward.abs().sum() > 0)
    adv = rloo_advantages(reward, gid)
    r, g = reward.tolist(), gid.tolist()
    for i in range(len(r)):
        others = [r[j] for j in range(len(r)) if g[j] == g[i] and j != i]
        want = r[i] - sum(others) / len(others) if others else 0.0
        assert abs(float(adv[i]) - want) < 1e-12


def random_mask(gen, N, T):
    """Right-padded rows with a prompt, policy tokens and a 'tool' gap inside."""
    mask = torch.zeros(N, T, dtype=torch.bool)
    for n in range(N):
        length = int(torch.randint(1, T + 1, (1,), generator=gen))
        start = int(torch.randint(0, length, (1,), generator=gen))
        mask[n, start:length] = True
        if length - start > 3:  # a tool observation in the middle
            mask[n, start + 1] = False
    return mask


def gae_reference(r, v, mask, gamma, lam):
    """Independent per-trajectory loop over the list of policy positions, in python floats."""
    N, T = mask.shape
    adv = [[0.0] * T for _ in range(N)]
    for n in range(N):
        pos = [t for t in range(T) if mask[n, t]]
        gae = 0.0
        for k in reversed(range(len(pos))):
            t = pos[k]
            nv = float(v[n, pos[k + 1]]) if k + 1 < len(pos) else 0.0
            delta = float(r[n, t]) + gamma * nv - float(v[n, t])
            gae = delta + gamma * lam * gae
            adv[n][t] = gae
    return torch.tensor(adv, dtype=torch.float64)


@SETTINGS
@given(
    st.integers(1, 5),
    st.integers(1, 9),
    st.floats(0.5, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_gae_matches_reference_loop(N, T, gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, N, T)
    r = torch.randn(N, T, generator=gen, dtype=torch.float64)
    v = torch.randn(N, T, generator=gen, dtype=torch.float64)
    adv, ret = gae_advantages(r, v, mask, gamma, lam)
    want = gae_reference(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, torch.where(mask, want + v, 0.0), rtol=0, atol=1e-10)


def test_gae_fixture_closed_form():
    # one trajectory: prompt, 3 policy tokens with a tool token between the 1st and 2nd
    mask = torch.tensor([[False, True, False, True, True]])
    r = torch.tensor([[9.0, 0.1, 9.0, 0.2, 1.0]], dtype=torch.float64)  # 9.0 on non-policy: ignored
    v = torch.tensor([[9.0, 0.5, 9.0, 0.4, 0.3]], dtype=torch.float64)
    g, lam = 0.9, 0.8
    d3 = 1.0 + g * 0.0 - 0.3
    d2 = 0.2 + g * 0.3 - 0.4
    d1 = 0.1 + g * 0.4 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    adv, _ = gae_advantages(r, v, mask, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, 0.0, a2, a3]], dtype=torch.float64))
    # gamma = lam = 1: A_t = (sum of future policy rewards) - V_t
    adv1, _ = gae_advantages(r, v, mask, 1.0, 1.0)
    want = [0.0, 1.3 - 0.5, 0.0, 1.2 - 0.4, 1.0 - 0.3]
    torch.testing.assert_close(adv1, torch.tensor([want], dtype=torch.float64))


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 8), st.floats(0.3, 1.0), st.integers(0, 2**31 - 1))
def test_discounted_returns_reference(N, T, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, N, T)
    r = torch.randn(N, T, generator=gen, dtype=torch.float64)
    got = discounted_returns(r, mask, gamma)
    want = torch.zeros(N, T, dtype=torch.float64)
    for n in range(N):
        run = 0.0
        for t in reversed(range(T)):
            if mask[n, t]:
                run = float(r[n, t]) + gamma * run
                want[n, t] = run
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_reinforce_pp_fixture():
    mask = torch.tensor([[False, True, True, False], [True, True, True, True], [False, False, True, False]])
    reward = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    pen = torch.tensor(
        [[0.0, -0.1, -0.2, 0.0], [-0.1, 0.0, 0.0, -0.3], [0.0, 0.0, -0.5, 0.0]], dtype=torch.float64
    )
    # gamma = 1 returns over policy tokens: row 0 [.., 1-0.3, 1-0.2, ..], row 1, row 2
    g0 = [1 - 0.1 - 0.2, 1 - 0.2]
    g1 = [-1 - 0.4, -1 - 0.3, -1 - 0.3, -1 - 0.3]
    g2 = [2 - 0.5]
    vals = g0 + g1 + g2
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / len(vals))
    eps = 1e-8
    z = [(x - mean) / (std + eps) for x in vals]
    want = torch.zeros(3, 4, dtype=torch.float64)
    want[0, 1:3] = torch.tensor(z[0:2], dtype=torch.float64)
    want[1, :] = torch.tensor(z[2:6], dtype=torch.float64)
    want[2, 2] = z[6]
    got = reinforce_pp_advantages(reward, mask, token_reward=pen, eps=eps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # with a group baseline (groups {0, 1}, {2}): R - group mean, then the same normalisation
    gid = torch.tensor([5, 5, 6])
    base = [1.0 - 0.0, -1.0 - 0.0, 0.0]  # group means 0 and 2
    vals = [base[0] - 0.3, base[0] - 0.2] + [base[1] - 0.4, base[1] - 0.3, base[1] - 0.3, base[1] - 0.3]
    vals += [base[2] - 0.5]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / len(vals))
    z = [(x - mean) / (std + eps) for x in vals]
    got = reinforce_pp_advantages(reward, mask, group_id=gid, token_reward=pen, eps=eps)
    torch.testing.assert_close(got[mask], torch.tensor(z, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(got[~mask].abs().sum()) == 0.0


def test_sequence_to_token_reward():
    mask = torch.tensor([[False, True, True, False], [False, False, False, False], [True, False, True, True]])
    got = sequence_to_token_reward(torch.tensor([1.5, 2.0, -3.0]), mask)
    want = torch.tensor([[0, 0, 1.5, 0], [0, 0, 0, 0], [0, 0, 0, -3.0]])
    torch.testing.assert_close(got, want)


def test_dynamic_sampling_fixture():
    reward = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    gid = torch.tensor([4, 4, 4, 2, 2, 8, 8, 3])
    keep, dropped = dynamic_sampling_filter(reward, gid)
    assert keep.tolist() == [False, False, False, True, True, False, False, False]
    assert dropped == 3  # group 4 (all 1), group 8 (all 0), group 3 (one sample)
    batch = TensorDict({REWARD: reward, GROUP_ID: gid, LOSS_MASK: torch.ones(8, 3, dtype=torch.bool)}, batch_size=[8])
    kept, stats = dynamic_sampling(batch)
    assert kept[LOSS_MASK].any(-1).tolist() == keep.tolist()  # rows stay; the dropped groups have no loss token
    assert kept[REWARD].tolist() == reward.tolist()
    assert stats == {"dapo/groups_dropped": 3, "dapo/groups_total": 4}


def test_overlong_penalty_fixture():
    lens = torch.tensor([5, 6, 7, 8, 10, 12])
    got = overlong_penalty(lens, max_len=10, buffer_len=4, factor=0.5)
    want = [0.0, 0.0, (6 - 7) / 4 * 0.5, (6 - 8) / 4 * 0.5, -0.5, -0.5]
    torch.testing.assert_close(got, torch.tensor(want))


def test_compute_advantages_batch():
    mask = torch.tensor([[False, True, True], [False, True, False], [True, True, True]])
    reward = torch.tensor([1.0, 0.0, 3.0])
    gid = torch.tensor([0, 0, 1])
    old = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[0.0, -1.5, -1.0], [0.0, -0.5, 0.0], [-0.1, -0.2, -0.3]])
    vals = torch.tensor([[0.0, 0.2, 0.1], [0.0, 0.3, 0.0], [0.5, 0.5, 0.5]])
    batch = TensorDict(
        {LOSS_MASK: mask, REWARD: reward, GROUP_ID: gid, OLD_LOGPROBS: old, REF_LOGPROBS: ref, VALUES: vals},
        batch_size=[3],
    )
    out = compute_advantages(batch, "dr_grpo")
    want = torch.tensor([[0, 0.5, 0.5], [0, -0.5, 0], [0, 0, 0]])
    torch.testing.assert_close(out[ADVANTAGES], want)
    assert ADVANTAGES not in batch.keys()  # a copy, the input is untouched
    # KL in the reward (k1 = log pi_old - log pi_ref): row 0 has 0.5 + (-1.0) = -0.5
    out = compute_advantages(batch, "dr_grpo", kl_coef=0.1, kl_kind="k1")
    r0, r1 = 1.0 - 0.1 * (-0.5), 0.0
    want = torch.tensor([[0, (r0 - r1) / 2, (r0 - r1) / 2], [0, (r1 - r0) / 2, 0], [0, 0, 0]])
    torch.testing.assert_close(out[ADVANTAGES], want)
    out = compute_advantages(batch, "gae", gamma=1.0, lam=1.0)
    want = torch.tensor([[0, 1.0 - 0.2, 1.0 - 0.1], [0, 0.0 - 0.3, 0], [3 - 0.5, 3 - 0.5, 3 - 0.5]])
    torch.testing.assert_close(out[ADVANTAGES], want)
    with pytest.raises(ValueError):
        compute_advantages(batch, "ppo")
