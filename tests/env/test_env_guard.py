"""Fault isolation of environment and reward calls (sidpt.env.guard)."""

import json
import time
from types import SimpleNamespace

import pytest

from sidpt.env import score
from sidpt.env.base import EnvState, StepResult
from sidpt.env.guard import Guard, GuardedEnv
from sidpt.errors import ConfigError


class FlakyEnv:
    """Answers "ok" turns; raises on "boom", sleeps on "hang"."""

    stop_strings = ("</x>",)

    def reset(self, sample):
        if sample.id == "bad-reset":
            raise OSError("retriever unreachable")
        return EnvState(sample)

    def step(self, state, text):
        if "boom" in text:
            raise KeyError("gold")
        if "hang" in text:
            time.sleep(3.0)
        state.turn += 1
        return StepResult(None, True, 1.0, {"finish": "answer", "turns": state.turn})

    def end(self, state, finish):
        return StepResult(None, True, 0.0, {"finish": finish})


def _sample(i):
    return SimpleNamespace(id=i)


def test_raising_and_hanging_env_calls_end_only_their_episode(tmp_path):
    log = tmp_path / "faults.jsonl"
    reports = []
    env = GuardedEnv(FlakyEnv(), Guard("isolate", timeout_s=0.3, log_path=log, report=reports.append))
    ok = env.step(env.reset(_sample("a")), "ok")
    assert (ok.done, ok.reward, ok.info) == (True, 1.0, {"finish": "answer", "turns": 1})
    boom = env.step(env.reset(_sample("b")), "the model says boom")
    assert (boom.done, boom.reward, boom.info["finish"]) == (True, 0.0, "error")
    assert boom.info["fault"] == "env.step: KeyError: 'gold'"
    t0 = time.perf_counter()
    hang = env.step(env.reset(_sample("c")), "hang")
    waited = time.perf_counter() - t0
    assert 0.3 <= waited < 2.0  # the timeout, not the 3 s sleep
    assert hang.reward == 0.0 and hang.info["fault"].startswith("env.step: TimeoutError")
    after = env.step(env.reset(_sample("d")), "ok")  # a fresh worker serves the next call
    assert after.reward == 1.0
    bad = env.reset(_sample("bad-reset"))  # a failed reset ends the episode at its first step
    res = env.step(bad, "ok")
    assert (res.done, res.reward, res.info["finish"]) == (True, 0.0, "error")
    assert res.info["fault"] == "env.reset: OSError: retriever unreachable"
    assert env.guard.count == 3
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["fault"], r["sample"]) for r in rows] == [("env.step", "b"), ("env.step", "c"), ("env.reset", "bad-reset")]
    assert rows[0]["text"] == "the model says boom" and "error" in rows[0]
    assert len(reports) == 3 and "sample 'b'" in reports[0] and "rollout/faults" in reports[2]
    assert env.stop_strings == ("</x>",)


def test_error_mode_names_the_sample():
    env = GuardedEnv(FlakyEnv(), Guard("error", timeout_s=0.0))
    with pytest.raises(ConfigError, match=r"env.step failed on sample 'q7': KeyError: 'gold' \(task.faults='isolate'"):
        env.step(env.reset(_sample("q7")), "boom")
    assert env.guard.count == 0


def _episode(i, info=None):
    return SimpleNamespace(sample=SimpleNamespace(id=i), info=dict(info or {}), reward=0.5,
                           out=SimpleNamespace(tokens=[1, 2, 3], prompt_len=1))


def test_reward_faults_give_zero_and_are_counted(tmp_path, monkeypatch):
    def reward(sample, text, info):
        return {"a": 2.0, "b": float("inf"), "c": None}[sample.id] if sample.id != "d" else time.sleep(3)

    reward.__module__, reward.__name__ = "my_rewards", "flaky"
    guard = Guard("isolate", timeout_s=0.3, log_path=tmp_path / "f.jsonl")
    eps = [_episode(i) for i in "abcd"] + [_episode("e", {"fault": "env.step: KeyError"})]
    score(eps, reward, lambda ids: " ".join(map(str, ids)), guard)
    assert [e.reward for e in eps] == [2.0, 0.0, 0.0, 0.0, 0.5]  # e: its env failed, its reward is not asked for
    assert eps[1].info["fault"] == "task.reward='my_rewards:flaky': returned inf"
    assert eps[2].info["fault"].startswith("task.reward='my_rewards:flaky': TypeError")
    assert eps[3].info["fault"].startswith("task.reward='my_rewards:flaky': TimeoutError")
    assert "fault" not in eps[0].info and guard.count == 3
    rows = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in rows] == ["b", "c", "d"] and rows[0]["text"] == "2 3"
