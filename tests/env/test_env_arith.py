"""The arithmetic environment: parsing and reward, seeded disjoint problems, SFT episodes, config
loading, statistics."""

import dataclasses
import re
from types import SimpleNamespace

import pytest

from sidpt.env import load_environment
from sidpt.env.arith import (
    ArithEnv, Config, Problem, format_prompt, make_problems, make_task, n_distinct, parse_answer, score,
)
from sidpt.errors import ConfigError

SMALL = dict(max_operand=19, ops=["+", "-"], n_train=300, n_heldout=40, n_sft=60, seed=5)


def _key(p):
    return (min(p.a, p.b), p.op, max(p.a, p.b)) if p.op in "+*" else (p.a, p.op, p.b)


def _step(text, answer=68, **kw):
    env = ArithEnv(**kw)
    state = env.reset(Problem("x", 0, "+", answer, answer))
    return env.step(state, text)


@pytest.mark.parametrize("text", ["6 8", "68", " 6 8 ", "\n6  8\t", "6 8 .", "68.", "+68", "+ 6 8",
                                  "6 8<|endoftext|>", "6 8 <|endoftext|>", "6 8 </s> <eos>"])
def test_exact_answer_in_any_spacing_scores_one(text):
    res = _step(text)
    assert (res.done, res.reward, res.observation) == (True, 1.0, None)
    assert res.info == {"finish": "answer", "correct": 1, "answer": 68}


def test_negative_answer():
    res = _step("- 1 9", answer=-19)
    assert res.reward == 1.0 and res.info["answer"] == -19
    assert _step("1 9", answer=-19).reward == pytest.approx(0.1 + 0.2 * 2 / 3)  # "19" vs "-19": 2 of 3


@pytest.mark.parametrize("text, same, longest", [
    ("6 9", 1, 2),  # the tens digit
    ("5 8", 1, 2),  # the units digit
    ("1 2", 0, 2),
    ("1 6 8", 2, 3),  # right-aligned: "168" vs "68"
    ("8", 1, 2),
    ("- 6 8", 2, 3),  # the sign counts as a character
    ("0", 0, 2),
])
def test_wrong_integer_gets_format_and_digit_credit(text, same, longest):
    res = _step(text, format_reward=0.1, digit_reward=0.2)
    assert res.reward == pytest.approx(0.1 + 0.2 * same / longest)
    assert res.info["finish"] == "answer" and res.info["correct"] == 0
    assert res.info["answer"] == int(text.replace(" ", ""))


def test_shaping_off_is_zero_one():
    assert _step("6 9", format_reward=0.0, digit_reward=0.0).reward == 0.0
    assert _step("6 8", format_reward=0.0, digit_reward=0.0).reward == 1.0


@pytest.mark.parametrize("text", ["", " ", "hello", "-", "+", ".", "6 8 . 7", "6 8 9 x", "Answer: 68",
                                  "6.8", "<unk> 6 8", "6 <|endoftext|> 8", "１２", "٣", "9" * 19, "\x00",
                                  "6 8" + " 8" * 200, "<|endoftext|>"])
def test_garbage_is_no_action_and_never_raises(text):
    res = _step(text)
    assert (res.done, res.reward) == (True, 0.0)
    assert res.info == {"finish": "no_action", "correct": 0, "answer": None}


def test_parse_answer_limits():
    assert parse_answer("9" * 18) == int("9" * 18)
    assert parse_answer("9" * 19) is None
    assert parse_answer(68) == 68  # not a string: read as its text
    assert parse_answer("007") == 7


def test_end_and_finished_episodes():
    env = ArithEnv()
    state = env.reset(Problem("x", 1, "+", 2, 3))
    res = env.end(state, "length")
    assert (res.done, res.reward, res.info) == (True, 0.0, {"finish": "length", "correct": 0, "answer": None})
    with pytest.raises(ValueError):
        env.step(state, "3")
    done = env.reset(Problem("x", 1, "+", 2, 3))
    env.step(done, "3")
    with pytest.raises(ValueError):
        env.end(done, "length")
    assert env.stop_strings == ()


def test_score_closed_form():
    assert score(None, 5, 0.1, 0.2) == 0.0
    assert score(5, 5, 0.1, 0.2) == 1.0
    assert score(123, 456, 0.1, 0.2) == pytest.approx(0.1)
    assert score(1456, 456, 0.3, 0.6) == pytest.approx(0.3 + 0.6 * 3 / 4)


def test_prompt_and_spelling():
    p = Problem("23+45", 23, "+", 45, 68)
    assert format_prompt(p) == "Compute 2 3 + 4 5 . Answer:"
    assert format_prompt(p, spaced=False) == "Compute 23 + 45 . Answer:"
    task = make_task(Config(**SMALL, spaced_digits=False), True, True)
    assert task.prompt(p) == "Compute 23 + 45 . Answer:"


def test_problems_are_deterministic_for_a_seed():
    a, b, c = (make_problems(Config(**{**SMALL, "seed": s})) for s in (5, 5, 6))
    assert a == b
    assert [p.id for p in a[0]] != [p.id for p in c[0]]
    train, heldout, sft = a
    assert (len(train), len(heldout), len(sft)) == (300, 40, 60)
    for p in train + heldout + sft:
        assert p.answer == {"+": p.a + p.b, "-": p.a - p.b}[p.op]
        assert 0 <= p.a <= 19 and 0 <= p.b <= 19 and p.op in ("+", "-")
        assert p.id == f"{p.a}{p.op}{p.b}" and p.where == ""
    assert {p.op for p in train} == {"+", "-"}


def test_splits_are_disjoint_also_up_to_commutation():
    train, heldout, sft = make_problems(Config(**SMALL))
    keys = [{_key(p) for p in s} for s in (train, heldout, sft)]
    assert [len(k) for k in keys] == [300, 40, 60]  # no duplicate inside a split either
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]


def test_heldout_does_not_depend_on_train_or_sft_sizes():
    base = make_problems(Config(**SMALL))
    more = make_problems(Config(**{**SMALL, "n_train": 200, "n_sft": 0}))
    assert more[1] == base[1]
    assert more[0] == base[2] + base[0][:140]  # the next problems drawn after the held-out ones


def test_every_distinct_problem_can_be_drawn():
    cfg = Config(max_operand=3, ops=["+", "-", "*"], n_train=32, n_heldout=4, n_sft=0)
    assert n_distinct(3, cfg.ops) == 10 + 16 + 10 == 36
    train, heldout, _ = make_problems(cfg)
    assert len({_key(p) for p in train + heldout}) == 36


def test_task_members():
    task = make_task(Config(**SMALL), is_main=False, need_sft=False)
    assert task.train == make_problems(Config(**SMALL))[0] and len(task.heldout) == 40
    assert task.eval_columns[0] == ("accuracy", "accuracy %")
    texts, specials = task.tokenizer_texts()
    assert specials == []
    for p in task.train + task.heldout + task.sft:
        assert task.prompt(p) in texts
    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)}
    assert words == {"Compute", "Answer", ":", ".", "+", "-", "*", *"0123456789"}  # digits are words
    # the cache is named by the texts (word ids follow their counts): same texts, same directory
    assert task.tokenizer_dir == make_task(Config(**SMALL), True, True).tokenizer_dir
    for other in ({"n_train": 100}, {"spaced_digits": False}, {"seed": 6}):
        assert task.tokenizer_dir != make_task(Config(**{**SMALL, **other}), True, True).tokenizer_dir
    assert str(task.tokenizer_dir).startswith("runs/arith-tokenizer/texts-")


def test_sft_episodes_are_ideal_and_parse_back():
    task = make_task(Config(**SMALL), True, True)
    eps = task.sft_episodes(25, seed=1)
    assert len(eps) == 25
    sft_ids = {p.id for p in task.sft}
    for e in eps:
        assert e.sample.id in sft_ids
        assert e.reward == 1.0 and e.info == {"finish": "answer", "correct": 1, "answer": e.sample.answer}
        assert len(e.turns) == 1 and e.turns[0].generated
        assert parse_answer(e.turns[0].text) == e.sample.answer
        assert re.fullmatch(r" (- )?\d( \d)*", e.turns[0].text)  # digit by digit
    assert [e.sample.id for e in eps] == [e.sample.id for e in task.sft_episodes(25, seed=1)]
    assert [e.sample.id for e in eps] != [e.sample.id for e in task.sft_episodes(25, seed=2)]
    assert len(task.sft_episodes(1000, seed=1)) == 60  # at most every SFT problem


def test_load_environment_builds_the_config():
    module, cfg = load_environment({"name": "arith", "max_operand": 9, "ops": ["+"], "n_train": 20,
                                    "n_heldout": 5, "n_sft": 5, "digit_reward": 0.0})
    assert module.__name__ == "sidpt.env.arith"
    assert cfg == Config(max_operand=9, ops=["+"], n_train=20, n_heldout=5, n_sft=5, digit_reward=0.0)
    task = module.make_task(cfg, True, True)
    assert len(task.train) == 20 and {p.op for p in task.train} == {"+"}


@pytest.mark.parametrize("table, key", [
    ({"max_operandd": 9}, "env.max_operandd"),
    ({"ops": "+"}, "env.ops"),
    ({"ops": ["/"]}, "env.ops"),
    ({"ops": ["+", "+"]}, "env.ops"),
    ({"ops": []}, "env.ops"),
    ({"n_train": 0}, "env.n_train"),
    ({"n_heldout": 0}, "env.n_heldout"),
    ({"n_sft": -1}, "env.n_sft"),
    ({"max_operand": -1}, "env.max_operand"),
    ({"max_operand": 9, "ops": ["+"], "n_train": 40, "n_heldout": 10, "n_sft": 10}, "env.n_train"),  # 55 exist
    ({"format_reward": -0.1}, "env.format_reward"),
    ({"format_reward": 0.5, "digit_reward": 0.6}, "env.format_reward"),
    ({"seed": "1"}, "env.seed"),
])
def test_load_environment_rejects_bad_keys(table, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_environment({"name": "arith", **table})


def _episode(sample, reward, info, n_generated, prompt_len=5):
    out = SimpleNamespace(generated=[False] * prompt_len + [True] * n_generated)
    return SimpleNamespace(sample=sample, reward=reward, info=info, out=out)


def test_metrics_equal_closed_form_sums():
    task = make_task(Config(**SMALL), True, True)
    env = task.env
    texts = ["3", "3", "4", "garbage", None]  # None: ended by the controller (length)
    n_gen = [2, 3, 2, 7, 9]
    p = Problem("1+2", 1, "+", 2, 3)
    eps = []
    for text, n in zip(texts, n_gen):
        state = env.reset(p)
        res = env.step(state, text) if text is not None else env.end(state, "length")
        eps.append(_episode(p, res.reward, res.info, n))
    m = task.metrics(eps)
    assert m["accuracy"] == (pytest.approx(100.0 * 2), 5.0)
    assert m["answered"] == (pytest.approx(100.0 * 3), 5.0)
    assert m["response_tokens"] == (float(sum(n_gen)), 5.0)
    assert set(m) >= {name for name, _ in task.eval_columns}
    assert [e.reward for e in eps] == pytest.approx([1.0, 1.0, 0.1, 0.0, 0.0])


def test_example_row():
    task = make_task(Config(**SMALL), True, True)
    p = task.heldout[0]
    state = task.env.reset(p)
    res = task.env.step(state, "1 2 3 4")
    row = task.example(_episode(p, res.reward, res.info, 4), "1 2 3 4")
    assert row == {"id": p.id, "prompt": task.prompt(p), "gold": p.answer, "answer": 1234, "correct": 0,
                   "reward": res.reward, "finish": "answer", "response": "1 2 3 4"}
    assert dataclasses.asdict(p)["answer"] == row["gold"]


def test_word_tokenizer_spells_numbers_with_digit_tokens(tmp_path):
    from sidpt.data import task_tokenizer

    task = make_task(Config(**SMALL), True, True)
    tok = task_tokenizer(task.tokenizer_texts, tmp_path, 0, True, "word")
    words = {"Compute", "Answer", ":", ".", "+", "-", "*", *"0123456789"}
    assert set(tok.tok.get_vocab()) == words | {"<|endoftext|>", "<unk>"}
    for e in task.sft_episodes(60, seed=0):
        ids = tok.encode(e.turns[0].text)
        assert len(ids) == len(e.turns[0].text.split())  # one token per digit (and "-")
        assert parse_answer(tok.decode(ids + [tok.eos_id])) == e.sample.answer  # as the rollout decodes it
    prompt_ids = tok.encode(task.prompt(Problem("23+45", 23, "+", 45, 68)))
    assert tok.decode(prompt_ids) == "Compute 2 3 + 4 5 . Answer :"


def test_metrics_on_rollout_episodes():
    from sidpt.rollout.engine import Output
    from sidpt.rollout.multiturn import Episode

    task = make_task(Config(**SMALL), True, True)
    p = task.heldout[0]
    eps = []
    for k, (text, n) in enumerate([(str(p.answer), 3), ("x", 5)]):
        state = task.env.reset(p)
        res = task.env.step(state, text)
        out = Output((0, k), [1] * (4 + n), 4, [0.0] * (4 + n), [False] * 4 + [True] * n, [-1] * (4 + n), "stop")
        eps.append(Episode((0, k), 0, out, res.reward, res.info, sample=p))
    assert task.metrics(eps) == {"accuracy": (100.0, 2.0), "answered": (100.0, 2.0), "response_tokens": (8.0, 2.0)}


@pytest.mark.slow  # the default suite reached 588 s of its 600 (the arith env's units stay in it)
def test_arith_reward_rises(tmp_path):
    """The recipe end to end (40-55 s on 2 cores): GRPO raises the reward and held-out accuracy.
    Measured (seed 0): mean reward of the first 10 RL steps 0.366, of the last 10 0.505; held-out
    greedy accuracy 30% -> 64%. The margins below are about half of those gains."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, "-m", "sidpt", "configs/arith.toml", f"--run.out_dir={tmp_path}",
           f"--env.tokenizer_dir={tmp_path / 'tokenizer'}"]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = tmp_path / "arith"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 100
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.07, (first, last)
    results = json.loads((run_dir / "results.json").read_text())["evaluations"]
    before, after = results["before"]["accuracy"], results["after"]["accuracy"]
    assert results["before"]["questions"] == results["after"]["questions"] == 100
    assert after > before + 15, (before, after)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["eval/accuracy"] for r in evals] == [before, after]
