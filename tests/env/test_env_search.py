"""The search environment: action parsing, a hand-built episode, the turn budget, malformed calls, garbage."""

import dataclasses

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sidpt.batch import FINISH_STOP, FINISH_TOOL_LIMIT
from sidpt.config import ConfigError, field_docs, from_dict
from sidpt.env.base import FINISH_CODES, StepResult, Turn, encode_turns, run_episode
from sidpt.env.search.bm25 import load_corpus
from sidpt.env.search.env import (
    CORRECTIONS,
    ERROR_KINDS,
    NO_RESULTS,
    SearchEnv,
    SearchEnvConfig,
    format_prompt,
    parse_action,
    prompt_messages,
    wrap_observation,
)

INFO_KEYS = {"n_turns", "n_searches", "n_errors", "finish", "answer", "em", "f1", "action", "retrieved",
             *(f"err_{k}" for k in ERROR_KINDS)}


@pytest.mark.parametrize("text,kind,content,errors", [
    ("<search>q</search>", "search", "q", ()),
    ("I should look it up. <search>  Zorvath   Kellimar </search>", "search", "Zorvath Kellimar", ()),
    ("<answer>Quorbin</answer>", "answer", "Quorbin", ()),
    ("<search>q", "invalid", "", ("unclosed",)),
    ("<answer>q", "invalid", "", ("unclosed",)),
    ("q</search>", "invalid", "", ("unopened",)),
    ("<search><search>q</search></search>", "search", "q", ("extra_tags",)),  # nested: innermost pair
    ("<search>a <answer> b</search>", "search", "a b", ("extra_tags",)),  # stray tags dropped from the query
    ("<answer>A</answer><search>q</search>", "answer", "A", ("extra_tags",)),  # first in text order wins
    ("<search>q</search> <answer>A</answer>", "search", "q", ("extra_tags",)),
    ("<answer>x <search>q</search> y</answer>", "search", "q", ("extra_tags",)),  # the first closing tag
    ("</answer> then <search>q</search>", "search", "q", ("extra_tags",)),  # first *complete* action
    ("<information>fake</information>", "none", "", ("extra_tags",)),
    ("just text", "none", "", ()),
    ("", "none", "", ()),
])
def test_parse_action(text, kind, content, errors):
    a = parse_action(text)
    assert (a.kind, a.content, a.errors) == (kind, content, errors)


def test_parse_action_is_linear_in_tags():
    # One pass over the tags: a long run of closing tags without openings is cheap (and not an action).
    assert parse_action("</search>" * 50_000 + "<search>q").errors == ("unclosed",)
    assert parse_action("<answer>" * 50_000 + "x</answer>").content == "x"


def _doc(task, doc_id):
    return next(d for d in load_corpus(task["corpus"]) if d.id == doc_id)


def test_stop_strings(env):
    assert env.stop_strings == ("</search>", "</answer>")


def test_search_then_answer_episode(env, task, questions):
    q = next(q for q in questions if q.meta["attribute"] == "birthplace")
    doc = _doc(task, q.meta["doc_id"])
    state = env.reset(q)
    r1 = env.step(state, f"Let me search. <search>{q.meta['entity']}</search>")
    assert isinstance(r1, StepResult) and not r1.done and r1.reward == 0.0
    assert r1.observation.startswith(f"\n\n<information>Doc 1(Title: {doc.title}) {doc.text}\nDoc 2(Title: ")
    assert r1.observation.endswith("</information>\n\n") and r1.observation.count("\nDoc ") == 2  # top 3
    assert r1.info["n_searches"] == 1 and r1.info["n_turns"] == 1 and r1.info["n_errors"] == 0
    assert q.answers[0] in r1.observation
    assert r1.info["retrieved"][0] == q.meta["doc_id"] and len(r1.info["retrieved"]) == 3
    r2 = env.step(state, f"<answer>{q.answers[0]}</answer>")
    assert r2.done and r2.observation is None and r2.reward == 1.0
    assert r2.info["finish"] == "answer" and r2.info["em"] == 1.0 and r2.info["f1"] == 1.0
    assert r2.info["n_searches"] == 1 and r2.info["answer"] == q.answers[0]
    assert set(r2.info) == INFO_KEYS and FINISH_CODES[r2.info["finish"]] == FINISH_STOP
    with pytest.raises(ValueError, match="finished episode"):
        env.step(state, "<answer>again</answer>")


def test_reward_em_and_f1(task, questions):
    q = next(q for q in questions if q.meta["attribute"] == "employer")
    word, suffix = q.answers[0].split()
    wrong = f"{word} {'Guild' if suffix != 'Guild' else 'Works'}"
    em_env = SearchEnv(SearchEnvConfig(corpus=str(task["corpus"])))
    f1_env = SearchEnv(SearchEnvConfig(corpus=str(task["corpus"]), reward="f1"), retriever=em_env.retriever)
    assert em_env.step(em_env.reset(q), f"<answer>{wrong}</answer>").reward == 0.0
    # golds ["Word Suffix", "Word"]: F1 1/2 against the first, 2/3 against the second
    res = f1_env.step(f1_env.reset(q), f"<answer>{wrong}</answer>")
    assert res.reward == pytest.approx(2 / 3, abs=1e-15) and res.info["em"] == 0.0
    # the alias, after normalisation
    assert em_env.step(em_env.reset(q), f"<answer>the {word}.</answer>").reward == 1.0


def test_turn_budget(env, questions):
    q = questions[0]
    state = env.reset(q)
    for i in range(3):  # max_turns = 3 observations
        res = env.step(state, f"<search>{q.meta['entity']}</search>")
        assert not res.done and res.info["n_turns"] == i + 1
    res = env.step(state, "<search>once more</search>")
    assert res.done and res.reward == 0.0 and res.observation is None
    assert res.info["finish"] == "tool_limit" and res.info["n_searches"] == 3
    assert FINISH_CODES["tool_limit"] == FINISH_TOOL_LIMIT
    state = env.reset(q)  # an answer is accepted after the last observation
    for _ in range(3):
        env.step(state, "<search>x</search>")
    res = env.step(state, f"<answer>{q.answers[0]}</answer>")
    assert res.done and res.reward == 1.0 and res.info["n_turns"] == 3


def test_malformed_calls_get_corrections(env, questions):
    q = questions[0]
    state = env.reset(q)
    res = env.step(state, "<search> ?! </search>")
    assert res.observation == wrap_observation(CORRECTIONS["empty"]) and not res.done
    assert res.info["err_empty"] == 1 and res.info["n_searches"] == 0 and res.info["n_turns"] == 1
    res = env.step(state, f"<search>{q.meta['entity']}")
    assert res.observation == f"\n\n<information>{CORRECTIONS['unclosed']}</information>\n\n"
    huge = q.meta["entity"] + " " + "x" * 5000
    res = env.step(state, f"<search>{huge}</search>")
    assert res.info["err_truncated"] == 1 and res.info["n_searches"] == 1
    assert res.observation.startswith(f"\n\n<information>Doc 1(Title: {q.meta['entity']}) ")
    assert res.info["n_errors"] == 3 and res.info["err_unclosed"] == 1
    res = env.step(state, "<answer></answer>")
    assert res.done and res.reward == 0.0 and res.info["err_empty"] == 2 and res.info["n_errors"] == 4


def test_no_action_and_no_results(env, questions):
    state = env.reset(questions[0])
    assert env.search("qqqqzzzz") == wrap_observation(NO_RESULTS)
    res = env.step(state, "I think the answer is obvious.")
    assert res.done and res.reward == 0.0 and res.info["finish"] == "no_action"


def test_end_for_length(env, questions):
    state = env.reset(questions[0])
    env.step(state, "<search>a</search>")
    res = env.end(state, "length")
    assert res.done and res.reward == 0.0 and res.info["finish"] == "length" and res.info["n_turns"] == 1


def test_run_episode_and_encode_turns(env, questions):
    q = questions[0]
    answer = f"<answer>{q.answers[0]}</answer>"
    ep = run_episode(env, q, lambda turns: answer if turns else "<search>x</search>")
    assert [t.generated for t in ep.turns] == [True, False, True] and ep.reward == 1.0
    turns = [Turn("ab", True), Turn("cde", False), Turn("f", True)]
    ids, mask = encode_turns(turns, lambda s: [ord(c) for c in s])
    assert ids == [97, 98, 99, 100, 101, 102] and mask == [True, True, False, False, False, True]


def test_prompt():
    p = format_prompt("Who is X?")
    assert p.endswith("\nQuestion: Who is X?\n") and "<search>query</search>" in p and "<answer>" in p
    assert prompt_messages("Who is X?") == [{"role": "user", "content": p}]


def test_config_validation(task):
    docs = field_docs(SearchEnvConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(SearchEnvConfig)}  # every field documented
    cfg = from_dict(SearchEnvConfig, {"corpus": str(task["corpus"]), "topk": 2, "reward": "f1"})
    assert cfg.topk == 2
    with pytest.raises(ConfigError, match="env.topk"):
        from_dict(SearchEnvConfig, {"topk": 0})
    with pytest.raises(ConfigError, match="reward"):
        from_dict(SearchEnvConfig, {"reward": "acc"})
    with pytest.raises(ValueError, match="corpus"):
        SearchEnv(SearchEnvConfig())


# -- garbage model outputs ------------------------------------------------------------------------

FRAGMENTS = [
    "<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "<", ">", "</", "/",
    "search", "answer", "<search", "answer>", "</sear", "<<search>>", " ", "\n", "Paris",
    "\x00", "\ufffd", "\u00e9", "\U0001f600", "\u202e",  # NUL, replacement char, accent, emoji, RTL override
]
piece = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.text(max_size=16),
    st.binary(max_size=16).map(lambda b: b.decode("latin-1")),
    st.integers(0, 2000).map(lambda n: "x " * n),
)
soup = st.lists(piece, max_size=12).map("".join)
# A tag pair (or half of one) around junk, so that complete, nested and broken actions all come up often.
near_action = st.tuples(soup, st.sampled_from(["<search>", "<answer>", ""]), soup,
                        st.sampled_from(["</search>", "</answer>", ""]), soup).map("".join)
turn_text = st.one_of(soup, near_action)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(turns=st.lists(turn_text, min_size=1, max_size=6), q_index=st.integers(0, 20))
def test_garbage_never_raises(env, questions, turns, q_index):
    state = env.reset(questions[q_index])
    res = None
    for i, text in enumerate(turns):
        res = env.step(state, text)
        assert isinstance(res, StepResult) and isinstance(res.done, bool) and type(res.reward) is float
        assert set(res.info) == INFO_KEYS
        assert res.info["n_errors"] == sum(res.info[f"err_{k}"] for k in ERROR_KINDS)
        assert 0 <= res.info["n_searches"] <= res.info["n_turns"] <= env.cfg.max_turns
        if res.done:
            assert res.observation is None and res.info["finish"] in ("answer", "no_action", "tool_limit")
            assert 0.0 <= res.reward <= 1.0 and (res.reward == 0.0 or res.info["finish"] == "answer")
            break
        assert isinstance(res.observation, str)
        assert res.observation.startswith("\n\n<information>")
        assert res.observation.endswith("</information>\n\n")
        assert res.info["finish"] is None and i < env.cfg.max_turns  # bounded: max_turns + 1 turns at most
    event(f"finish={res.info['finish']}")
    event(f"n_searches={res.info['n_searches']}")
    if not res.done:
        end = env.end(state, "length")
        assert end.done and end.reward == 0.0 and end.info["finish"] == "length"
