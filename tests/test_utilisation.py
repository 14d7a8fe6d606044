"""RL utilisation (sidpt.utilisation, docs/rlu.md): eta_use on hand-built batches through the
controller's own ``train`` (exactly 0 when every group's rewards are equal, exactly 1 when every
token carries weight and nothing is padded), the usefulness against a token loop, the waterfall
and RLU against their closed forms, and the accounts' sum over ranks.

``assert_waterfall`` is the check the multi-rank runs (tests/spine: colocated, disaggregated,
async) apply to their metrics rows: the timed phases add up to the devices' time within 1%.
"""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidpt.batch import Trajectory, trajectories_to_batch
from sidpt.config import Config
from sidpt.flops import Peaks
from sidpt.metrics import Timers
from sidpt.model import ModelArgs, build_model
from sidpt.trainer import OptimConfig, Trainer
from sidpt.utilisation import PHASES, StepWork, rlu_row, usefulness, weighted_mask

TINY = ModelArgs(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64)


def assert_waterfall(row: dict, tol: float = 0.01) -> None:
    """A metrics row's (or results.json's) waterfall: every share in [0, 1], the untimed rest
    under ``tol`` of the devices' time, and the shares summing to 1."""
    shares = {k: v for k, v in row.items() if k.startswith("waterfall/")}
    assert set(shares) >= {f"waterfall/{p}" for p in PHASES} | {"waterfall/other"}, sorted(shares)
    assert all(-1e-9 <= v <= 1 + 1e-9 for k, v in shares.items() if k != "waterfall/other"), shares
    assert abs(row["waterfall/other"]) < tol, shares
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert 0 < row["rlu/u_hw"] < 1 and 0 <= row["rlu/eta_use"] <= 1 and 0 < row["rlu/eta_ess"] <= 1
    assert row["rlu/rlu"] == pytest.approx(row["rlu/u_hw"] * row["rlu/eta_use"] * row["rlu/eta_ess"], rel=1e-12)
    roles = {k.split("/")[0] for k in row if k.startswith("waterfall_")}
    for role in roles:  # each role's ranks over their own time (runs with more than one role)
        part = {k: v for k, v in row.items() if k.startswith(f"{role}/")}
        assert abs(part[f"{role}/other"]) < tol and sum(part.values()) == pytest.approx(1.0, abs=1e-9), part
    if roles:
        assert sum(row[f"rlu/device_s_{r.removeprefix('waterfall_')}"] for r in roles) == pytest.approx(
            row["rlu/device_s"] * (1 - row.get("waterfall/between_steps", 0.0)), rel=1e-9)


def hand_batch(rewards: list[list[float]], prompt: int = 3, response: int = 4, seed: int = 0):
    """Groups of trajectories, every one ``prompt`` + ``response`` tokens long (nothing padded),
    with rollout log-probs near the tiny model's (so the correction keeps every token)."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for gi, group in enumerate(rewards):
        for j, rew in enumerate(group):
            tokens = torch.randint(1, TINY.vocab_size, (prompt + response,), generator=g).tolist()
            mask = [False] * prompt + [True] * response
            lps = [-(4.1 + 0.1 * float(torch.rand(1, generator=g))) if m else 0.0 for m in mask]
            trajs.append(Trajectory(gi, j, tokens, mask, [0] * len(tokens), lps, prompt, 0, rew))
    return trajectories_to_batch(trajs)


def train_accounts(batch, **algo) -> StepWork:
    """The controller's ``train`` on ``batch`` (a tiny model, one process), then a generation
    and a publish roofline as a rollout rank would add them: the step's summed accounts."""
    from sidpt.controller import train

    cfg = Config()
    for k, v in algo.items():
        setattr(cfg.algo, k, v)
    trainer = Trainer(build_model(TINY, seed=1), OptimConfig(1e-3, 0.0, (0.9, 0.999), 1.0, micro_batch_tokens=64))
    r = SimpleNamespace(cfg=cfg, trainer=trainer, plan=SimpleNamespace(own_reference=False, trainer_dp=(0, 1)),
                        timers=Timers(), peaks=Peaks(3e9, 1e10, "test"), work=StepWork())
    stats = train(r, batch, 1e-3)
    assert stats["train/tokens"] > 0 or "loss/total" in stats
    r.work.add("generate", seconds=0.5, roofline=0.37)
    r.work.add("publish", seconds=0.1, roofline=0.011)
    r.work.wall = 2.0
    return r.work


def test_eta_use_is_zero_when_every_group_has_equal_rewards():
    work = train_accounts(hand_batch([[1.0, 1.0], [0.0, 0.0], [0.5, 0.5]]))
    row = rlu_row(work, ess=1.0)
    assert sum(work.roofline.values()) > 0.37  # the generation's, and the trainer's work was counted
    assert row["rlu/eta_use"] == 0.0 and row["rlu/rlu"] == 0.0
    assert work.weighted_len == 0.0 and work.total_len == 6 * 7


def test_eta_use_is_one_when_every_token_carries_weight_and_nothing_is_padded():
    # every group's rewards differ, so every response token has a non-zero advantage
    for correction in ("none", "token-tis"):
        work = train_accounts(hand_batch([[1.0, 0.0], [0.0, 0.5], [0.2, 0.9]]), correction=correction,
                              dynamic_sampling=True)
        row = rlu_row(work, ess=1.0)
        assert work.roofline["train"] > 0 and work.useful["train"] == work.roofline["train"]
        assert row["rlu/eta_use"] == 1.0, correction
        assert work.weighted_len == work.total_len == 6 * 7


def test_eta_use_counts_the_groups_that_teach():
    """Two groups teach, one does not: eta_use is their token share of every phase (equal lengths:
    2/3 exactly, to rounding); with the lean step's savings the trainer did no work on the third."""
    work = train_accounts(hand_batch([[1.0, 0.0], [0.3, 0.3], [0.2, 0.9]]))
    row = rlu_row(work, ess=1.0)
    assert work.weighted_len / work.total_len == pytest.approx(2 / 3, rel=1e-12)
    useful_train = work.useful["train"] / work.roofline["train"]
    assert useful_train == pytest.approx(1.0, rel=1e-12)  # the lean step trained only the teaching rows
    expect = (0.37 * 2 / 3 + 0.011 * 2 / 3 + work.roofline["train"]) / (0.37 + 0.011 + work.roofline["train"])
    assert row["rlu/eta_use"] == pytest.approx(expect, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**31 - 1), st.booleans())
def test_usefulness_equals_a_token_loop(n, T, seed, regularised):
    g = torch.Generator().manual_seed(seed)
    resp = torch.rand(n, T, generator=g) < 0.6
    train_mask = resp & (torch.rand(n, T, generator=g) < 0.8)
    adv = torch.where(torch.rand(n, T, generator=g) < 0.3, 0.0, torch.randn(n, T, generator=g))
    weight = torch.where(torch.rand(n, T, generator=g) < 0.2, 0.0, torch.rand(n, T, generator=g) + 0.1)
    u = usefulness(resp, weighted_mask(train_mask, adv, weight, regularised))
    for i in range(n):
        r_tok = [t for t in range(T) if resp[i, t]]
        w_tok = [t for t in r_tok if train_mask[i, t] and weight[i, t] != 0 and (regularised or adv[i, t] != 0)]
        assert float(u[i]) == (len(w_tok) / len(r_tok) if r_tok else 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.floats(0, 1), st.floats(0, 1)), min_size=len(PHASES),
                max_size=len(PHASES)), st.floats(0.1, 10), st.floats(0, 1), st.floats(0.05, 1), st.floats(0, 3))
def test_waterfall_and_rlu_closed_forms(per_phase, slack, u, ess, between):
    """seconds, roofline (a fraction of them) and useful (a fraction of that) per phase, split over
    two ranks: the sum over ranks is the sum, and rlu_row is its closed form."""
    a, b = StepWork(), StepWork()
    for p, (sec, f_roof, f_use) in zip(PHASES, per_phase):
        rank = a if hash(p) % 2 else b
        rank.add(p, sec, sec * f_roof, sec * f_roof * f_use if p in ("recompute", "train") else None)
    a.wall = sum(x[0] for x in per_phase) + slack
    b.weighted_len, b.total_len = 10 * u, 10.0
    w = a + b
    assert w.vector() == [x + y for x, y in zip(a.vector(), b.vector())]
    row = rlu_row(w, ess, between=between)
    wall = a.wall + between
    assert row["waterfall/other"] == pytest.approx(slack / wall, abs=1e-9)
    assert row.get("waterfall/between_steps", 0.0) == pytest.approx(between / wall, abs=1e-12)
    roof = sum(s * f for s, f, _ in per_phase)
    useful = sum(s * f * (g if p in ("recompute", "train") else 10 * u / 10.0)
                 for p, (s, f, g) in zip(PHASES, per_phase))
    assert row["rlu/u_hw"] == pytest.approx(roof / wall, rel=1e-9, abs=1e-12)
    assert row["rlu/eta_use"] == pytest.approx(useful / roof if roof else 0.0, rel=1e-9, abs=1e-12)
    assert row["rlu/rlu"] == pytest.approx(roof / wall * (useful / roof if roof else 0.0) * ess, rel=1e-9, abs=1e-12)


def test_unknown_phase_is_refused():
    with pytest.raises(KeyError, match="unknown phase 'decode'"):
        StepWork().add("decode", 1.0)
