"""The long-tailed copy task (sidpt.env.echo): lengths, parsing, the reward's closed form."""

import statistics

import pytest

from sidpt.env.base import run_episode
from sidpt.env.echo import Config, EchoTask, answer_text, draw_length, parse_copy, score
from sidpt.errors import ConfigError


def test_response_lengths_are_long_tailed():
    """The ideal response is the L letters and EOS: p90 / p10 of that over the train set >= 8."""
    task = EchoTask(Config())
    lengths = sorted(len(p.letters) + 1 for p in task.train)
    q = statistics.quantiles(lengths, n=10)
    assert q[-1] / q[0] >= 8, q
    assert min(lengths) <= 3 and max(lengths) == 49  # the 12 one-letter strings go to held-out and SFT first


def test_problems_are_distinct_and_deterministic():
    a, b = EchoTask(Config(seed=3)), EchoTask(Config(seed=3))
    assert [p.letters for p in a.train] == [p.letters for p in b.train]
    every = [p.letters for p in (*a.train, *a.heldout, *a.sft)]
    assert len(set(every)) == len(every)


def test_reward_and_parse():
    gold = ("c", "a", "h")
    assert parse_copy(" c a h <|endoftext|>") == gold and parse_copy("c a h .") == gold
    assert parse_copy("c ab h") is None and parse_copy("") is None and parse_copy("c 1") is None
    assert score(gold, gold, 0.5) == 1.0
    assert score(("c", "a"), gold, 0.5) == pytest.approx(0.5 * 2 / 3)
    assert score(("c", "b", "h", "h"), gold, 0.5) == pytest.approx(0.5 * 2 / 4)
    assert score(None, gold, 0.5) == 0.0


def test_ideal_episodes_score_one():
    task = EchoTask(Config(n_train=10, n_heldout=5, n_sft=20))
    eps = task.sft_episodes(20, seed=0)
    assert len(eps) == 20 and all(e.reward == 1.0 for e in eps)
    p = task.heldout[0]
    assert run_episode(task.env, p, lambda turns: answer_text(p) + " x").reward < 1.0


def test_draw_length_bounds_and_config_errors():
    import random
    rng = random.Random(0)
    draws = [draw_length(rng, 2, 5) for _ in range(2000)]
    assert set(draws) == {2, 3, 4, 5}
    with pytest.raises(ConfigError, match="env.min_len"):
        Config(min_len=0).validate()
    with pytest.raises(ConfigError, match="env.alphabet"):
        Config(alphabet=30).validate()
