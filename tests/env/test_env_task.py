"""The generated search task: deterministic, entity-disjoint splits, answers only in the corpus, BM25 finds
the entity, SFT trajectories on their own entities; the CLI writes the same files."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sidpt.env.search.bm25 import load_bm25, load_corpus, tokenize
from sidpt.env.search.scoring import exact_match
from sidpt.env.search.env import SearchEnv, SearchEnvConfig, format_prompt, load_questions
from sidpt.env.search.task import ATTRIBUTES, make_search_task, sft_episodes

ROOT = Path(__file__).resolve().parents[2]
FILES = ("corpus.jsonl", "train.jsonl", "heldout.jsonl", "sft.jsonl", "task.json")


def _bytes(d):
    return {f: (Path(d) / f).read_bytes() for f in FILES}


def test_deterministic_for_a_seed(tmp_path):
    a = _bytes(make_search_task(tmp_path / "a", 40, seed=3)["corpus"].parent)
    b = _bytes(make_search_task(tmp_path / "b", 40, seed=3)["corpus"].parent)
    c = _bytes(make_search_task(tmp_path / "c", 40, seed=4)["corpus"].parent)
    assert a == b
    assert a["corpus.jsonl"] != c["corpus.jsonl"]


def test_cli_writes_the_same_files(tmp_path):
    make_search_task(tmp_path / "lib", 30, seed=5)
    cmd = [sys.executable, str(ROOT / "tools" / "make_search_task.py"), "--out", str(tmp_path / "cli"),
           "--n-entities", "30", "--seed", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "heldout" in out.stdout
    assert _bytes(tmp_path / "cli") == _bytes(tmp_path / "lib")


def test_splits_and_answers(task):
    docs = {d.id: d for d in load_corpus(task["corpus"])}
    split = {name: load_questions(task[name]) for name in ("train", "heldout", "sft")}
    meta = json.loads(task["task"].read_text())
    assert (meta["n_train_entities"], meta["n_heldout_entities"], meta["n_sft_entities"]) == (42, 12, 6)
    entities = {name: {q.meta["entity"] for q in qs} for name, qs in split.items()}
    assert [len(entities[n]) for n in ("train", "heldout", "sft")] == [42, 12, 6]
    assert not entities["train"] & entities["heldout"]
    assert not entities["sft"] & (entities["train"] | entities["heldout"])
    # One document per entity, names unique.
    assert len(docs) == 60 and len({d.title for d in docs.values()}) == 60
    for name, qs in split.items():
        assert len(qs) == len(ATTRIBUTES) * len(entities[name])
        for q in qs:
            doc = docs[q.meta["doc_id"]]
            assert doc.title == q.meta["entity"] and q.meta["entity"] in q.question
            assert all(a in doc.text for a in q.answers)  # the answer is in the entity's document ...
            assert q.answers[0] not in q.question  # ... and not given away by the question
    # Distractors: every entity shares its first name with a namesake, and is named in another's document.
    firsts = [d.title.split()[0] for d in docs.values()]
    assert all(firsts.count(f) == 2 for f in firsts)
    mentioned = sum(any(d.title in o.text for o in docs.values() if o.id != d.id) for d in docs.values())
    assert mentioned >= 30  # rivals are drawn at random, so not everyone is someone's rival


def test_guess_floor_is_low(task):
    """task.json's floor, recomputed from the files: answer each held-out question with the most
    frequent train answer of its attribute."""
    train, held = load_questions(task["train"]), load_questions(task["heldout"])
    hits = 0
    for attr in ATTRIBUTES:
        counts = Counter(q.answers[0] for q in train if q.meta["attribute"] == attr)
        guess = max(sorted(counts), key=counts.__getitem__)
        hits += sum(exact_match(guess, q.answers[:1]) for q in held if q.meta["attribute"] == attr)
    floor = json.loads(task["task"].read_text())["heldout_guess_em"]
    assert floor == round(hits / len(held), 6) and floor < 0.1


def test_entity_name_retrieves_its_document(tmp_path):
    paths = make_search_task(tmp_path, 300, seed=11)
    bm = load_bm25(paths["corpus"])
    qs = [q for name in ("train", "heldout", "sft") for q in load_questions(paths[name])]
    top1 = sum(bm.search(q.meta["entity"], 1)[0][0].id == q.meta["doc_id"] for q in qs) / len(qs)
    assert top1 >= 0.95, top1
    # The invented words are not guessable from the question's own vocabulary: answers share no token with it.
    assert all(not set(tokenize(q.answers[0])) & set(tokenize(q.question)) for q in qs)


def test_sft_episodes(task):
    env = SearchEnv(SearchEnvConfig(corpus=str(task["corpus"])))
    sft = load_questions(task["sft"])
    eps = sft_episodes(env, sft)
    assert len(eps) == len(sft)  # the ideal trajectory works for every SFT question here
    held_entities = {q.meta["entity"] for name in ("train", "heldout") for q in load_questions(task[name])}
    for ep in eps:
        q = ep.sample
        assert [t.generated for t in ep.turns] == [True, False, True]
        assert ep.turns[0].text == f"<search>{q.meta['entity']}</search>"
        assert ep.turns[1].text.startswith(f"\n\n<information>Doc 1(Title: {q.meta['entity']}) ")
        assert ep.turns[2].text == f"<answer>{q.answers[0]}</answer>" and q.answers[0] in ep.turns[1].text
        assert ep.reward == 1.0 and ep.info["n_searches"] == 1
        assert q.meta["entity"] not in held_entities
    text = format_prompt(eps[0].sample.question) + "".join(t.text for t in eps[0].turns)
    # One <search> in the instruction, one in the turn.
    assert text.count("<search>") == 2 and text.endswith("</answer>")


def test_sft_entities_are_extra_and_seen_once(tmp_path):
    """sft_entities: that many extra entities, one question each (attributes in turn), in the
    corpus, disjoint from train and held-out; their values come from the main task's pools."""
    base = make_search_task(tmp_path / "base", 60, seed=2, name_pool=20)
    paths = make_search_task(tmp_path / "x", 60, seed=2, name_pool=20, sft_entities=48)
    meta = json.loads(paths["task"].read_text())
    assert meta["n_sft_entities"] == 48 and meta["sft_frac"] == 0.0 and meta["format"] >= 2
    sft = load_questions(paths["sft"])
    assert len(sft) == 48 and len({q.meta["entity"] for q in sft}) == 48
    assert Counter(q.meta["attribute"] for q in sft) == {a: 8 for a in ATTRIBUTES}
    ents = {split: {q.meta["entity"] for q in load_questions(paths[split])} for split in ("train", "heldout")}
    assert not ({q.meta["entity"] for q in sft} & (ents["train"] | ents["heldout"]))
    assert len(ents["train"]) + len(ents["heldout"]) == 60
    corpus = {d.id: d for d in load_corpus(paths["corpus"])}
    assert len(corpus) == 108 and all(q.answers[0] in corpus[q.meta["doc_id"]].text for q in sft)
    base_places = {q.answers[0] for q in load_questions(base["train"]) if q.meta["attribute"] == "birthplace"}
    places = {q.answers[0] for q in sft if q.meta["attribute"] == "birthplace"}
    assert len(places | base_places) <= max(8, 60 // 4)  # the same pool of cities: no new words


def test_attributes_choose_the_questions(tmp_path):
    """env.attributes: questions (train, held-out, SFT) ask only about those; documents still
    state every attribute."""
    paths = make_search_task(tmp_path, 40, seed=1, attributes=("rival", "birthplace"))
    meta = json.loads(paths["task"].read_text())
    assert meta["attributes"] == ["rival", "birthplace"]
    for split in ("train", "heldout", "sft"):
        qs = load_questions(paths[split])
        assert qs and {q.meta["attribute"] for q in qs} == {"rival", "birthplace"}
    doc = load_corpus(paths["corpus"])[0]
    assert " was born in " in doc.text and " works for " in doc.text
    with pytest.raises(ValueError, match="attributes"):
        make_search_task(tmp_path / "bad", 40, attributes=("hair",))
