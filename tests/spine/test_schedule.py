"""The async pipeline's schedules (sidpt.schedule) on a simulated pipeline, and the bias figures
against hand-computed values.

The simulator is the pipeline's timing without models: ticks of time; a rollout side that starts
group i (step p = i // B) once the trainer's published version w satisfies w >= p - lookahead,
stamping its samples with w; each sample finishes a drawn number of ticks later (in continue
mode a sample's later tokens carry later versions: the oldest is its start's); the trainer tries
to fill a step every tick and publishes w + 1 when it does. Hypothesis draws B, G, k, the policy
and the durations (long-tailed: most short, some very long)."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sidpt.batch import Trajectory
from sidpt.schedule import POLICIES, PipelineState, lookahead, slack


def traj(group: int, index: int, length: int, version: int, reward: float = 0.0, later: int = 0) -> Trajectory:
    """A trajectory of ``length`` sampled tokens: the first by ``version``, the rest by ``version + later``."""
    versions = [-1, -1] + [version] + [version + later] * (length - 1)
    return Trajectory(group, index, list(range(2 + length)), [False, False] + [True] * length, versions,
                      [0.0] * (2 + length), 2, 0, reward)


def simulate(policy: str, B: int, G: int, k: int, durations: list[int], steps: int, resume_at: int = -1):
    """``resume_at``: at that step, the pipeline is checkpointed (``state_dict`` through
    ``torch.save`` / ``torch.load(weights_only=True)``), the samples in flight are lost, and the
    resumed pipeline first runs again what ``missing`` names, with the version it resumes at."""
    state = PipelineState(policy, B, G, k, window=4)
    a, started, inflight, trained_at, tick, redo = lookahead(policy, k), 0, [], {}, 0, []

    def start(group: int, j: int) -> None:
        d = durations[(group * G + j + 7 * len(redo)) % len(durations)]
        inflight.append((tick + d, traj(group, j, 1 + d, state.step, reward=float(d < 3), later=1)))

    while state.step < steps:
        tick += 1
        assert tick < 10_000, "the pipeline made no progress"
        if state.step == resume_at:
            state = _resume(state)
            started, redo, inflight, resume_at = _restart(state, inflight), state.missing()[0], [], -1
            for g, idx in redo:
                for j in idx:
                    start(g, j)
        while started // B <= state.step + a:  # the rollout side holds version state.step
            for j in range(G):
                start(started, j)
            started += 1
        for t in [t for when, t in inflight if when <= tick]:
            state.add(t)
        inflight = [(when, t) for when, t in inflight if when > tick]
        chosen = state.select()  # raises if a trained token exceeded k
        if chosen is not None:
            for t in chosen:
                trained_at[(t.group, t.index)] = state.step
            state.metrics(chosen)
            state.advance()
    return state, trained_at


def _resume(state: PipelineState) -> PipelineState:
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    out = PipelineState(state.policy, state.B, state.G, state.k, state.window)
    out.load_state_dict(torch.load(buf, weights_only=True))
    return out


def _restart(state: PipelineState, inflight: list) -> int:
    """Where the resumed rollout side goes on (``missing``'s first group), checked against what
    was lost: the samples in flight are exactly ``missing``'s redo list and the groups from its first."""
    redo, first = state.missing()
    lost = {(t.group, t.index) for _, t in inflight if t.group not in state.dead}  # (dead: dropped on arrival)
    started = max([g for g, _ in lost] + [first - 1]) + 1
    assert lost == {(g, j) for g, idx in redo for j in idx} | {(g, j) for g in range(first, started) for j in range(state.G)}
    return first


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(POLICIES), B=st.integers(1, 4), G=st.integers(1, 3), k=st.integers(0, 3),
       durations=st.lists(st.one_of(st.integers(0, 2), st.integers(5, 30)), min_size=1, max_size=12))
def test_simulated_pipeline_keeps_the_bound(policy, B, G, k, durations):
    state, trained_at = simulate(policy, B, G, k, durations, steps=10)
    if policy in ("paced", "debiased"):  # never discard; every group by its deadline p + slack
        assert state.dropped == 0
        assert all(s <= g // B + slack(policy, k) for (g, _), s in trained_at.items())
        assert len(trained_at) == 10 * B * G
    if policy == "paced":  # oldest first, exactly: step s trains the groups of step s
        assert all(s == g // B for (g, _), s in trained_at.items())


def test_fifo_drops_stale_and_measures_the_bias():
    """k = 1, B = 1, G = 2; a long sample of group 0 arrives after its bound: dropped, and the
    ratios are the hand-computed ones."""
    st_ = PipelineState("fifo", B=1, G=2, k=1, window=8)
    st_.add(traj(0, 0, length=2, version=0, reward=1.0))
    st_.add(traj(1, 0, length=4, version=0, reward=1.0))
    chosen = st_.select()  # the first two to finish, from two groups
    assert [(t.group, t.index) for t in chosen] == [(0, 0), (1, 0)]
    st_.metrics(chosen), st_.advance()
    st_.add(traj(1, 1, length=2, version=1, reward=0.0))
    assert st_.select() is None  # one pending trajectory, two needed
    st_.advance()  # (pretend a step passed: version 2 now; group 0's long sample is 2 behind)
    st_.add(traj(0, 1, length=30, version=0, reward=0.0))
    st_.add(traj(2, 0, length=2, version=2, reward=1.0))
    chosen = st_.select()
    assert st_.dropped == 1 and [(t.group, t.index) for t in chosen] == [(1, 1), (2, 0)]
    m = st_.metrics(chosen)
    # sampled: lengths 2, 4, 2, 30, 2 (mean 8), rewards 1, 1, 0, 0, 1 (0.6); trained: 2, 4, 2, 2 (2.5), 1, 1, 0, 1
    assert m["bias/length_ratio_run"] == pytest.approx(2.5 / 8)
    assert m["bias/reward_ratio_run"] == pytest.approx(0.75 / 0.6)
    assert m["staleness/max"] == 1 and m["staleness/tokens_0"] == 2 and m["staleness/tokens_1"] == 2


def test_group_complete_drops_a_group_whole():
    st_ = PipelineState("group_complete", B=1, G=2, k=0, window=8)
    st_.add(traj(0, 0, 3, version=0))
    st_.advance()  # step 1: group 0's sample is stale
    st_.add(traj(0, 1, 3, version=1))
    st_.add(traj(1, 0, 3, version=1))
    assert st_.select() is None and st_.dropped == 2 and 0 in st_.dead
    st_.add(traj(0, 1, 3, version=1))  # a late member of a dropped group is dropped on arrival
    assert st_.dropped == 3
    st_.add(traj(1, 1, 3, version=1))
    assert [(t.group, t.index) for t in st_.select()] == [(1, 0), (1, 1)]


def test_debiased_takes_due_groups_first_then_the_first_completed():
    """k = 2: slack 1, lookahead 1. At step 1 group 0 (step 0) is due; the fill is the group that
    completed first among the rest."""
    st_ = PipelineState("debiased", B=2, G=1, k=2, window=8)
    for g in (3, 1, 2):
        st_.add(traj(g, 0, 2, version=0))
    assert [t.group for t in st_.select()] == [1, 3]  # step 0: nothing due (deadline 0 + 1), completion order
    st_.metrics([]), st_.advance()
    assert st_.select() is None  # step 1: group 0 is due and has not finished: wait
    st_.add(traj(0, 0, 2, version=0))
    assert [t.group for t in st_.select()] == [0, 2]


def test_starvation_counts_low_pass_groups_not_trained():
    """Window 1, k = 0 (lookahead 0): the cohort at step 2 is the groups started at step 1 (group 1)."""
    st_ = PipelineState("fifo", B=1, G=2, k=0, window=1)
    st_.add(traj(1, 0, 2, version=1, reward=0.0))  # group 1 has a low pass rate and is never trained
    st_.step = 2
    assert st_.metrics([])["bias/starved_low_pass"] == 1.0
    st_.add(traj(1, 1, 2, version=2, reward=1.0))  # pass rate 0.5: no longer low
    assert st_.metrics([])["bias/starved_low_pass"] == 0.0


@settings(max_examples=40, deadline=None)
@given(policy=st.sampled_from(POLICIES), B=st.integers(1, 4), G=st.integers(1, 3), k=st.integers(0, 3),
       durations=st.lists(st.one_of(st.integers(0, 2), st.integers(5, 30)), min_size=1, max_size=12),
       resume_at=st.integers(1, 8))
def test_resumed_pipeline_keeps_the_bound_and_loses_nothing(policy, B, G, k, durations, resume_at):
    """A checkpoint mid-run (the schedule's state round-tripped through a weights_only load), the
    samples in flight lost and run again from ``missing``: the bound holds (``select`` raises
    otherwise), and the never-discard schedules still train every sample by its deadline."""
    state, trained_at = simulate(policy, B, G, k, durations, steps=10, resume_at=resume_at)
    if policy in ("paced", "debiased"):
        assert state.dropped == 0 and len(trained_at) == 10 * B * G
        assert all(s <= g // B + slack(policy, k) for (g, _), s in trained_at.items())
