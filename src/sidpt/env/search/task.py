"""A search task that no model can solve from memory: questions about invented people.

``make_search_task(out_dir, n_entities, seed)`` writes, deterministically for a seed:

- ``corpus.jsonl``: one document per entity, ``{"id", "title", "text"}``. Names, cities and
  employers are invented from random syllables (every invented word is unique in the task and
  none is an English word of the templates); professions and colours come from fixed lists.
  A document reads "The birthplace of Zorvath Kellimar is Quorbin. Zorvath Kellimar was born in
  1873. The profession of Zorvath Kellimar is astronomer. Zorvath Kellimar works for Vantrel
  Works. ..." (see ``entity_document``).
- Distractors: entities come in pairs of **namesakes** sharing the first name, their surnames one
  syllable apart ("Zorvath Kellimar" / "Zorvath Kellimor"); and every document names another
  entity as a rival, so a search for a name also returns other people's documents with other
  attributes. Retrieval and reading the right document both matter.
- ``train.jsonl``, ``heldout.jsonl``, ``sft.jsonl``: one question per attribute (``ATTRIBUTES``)
  per entity, ``{"id", "question", "answers", "entity", "attribute", "doc_id"}``. The entities are
  split three ways, disjoint: **held-out questions are about entities that no train (or SFT)
  question mentions** (about ``heldout_frac`` of them), SFT questions about another disjoint
  ``sft_frac``. Every entity has a document, so all questions are answerable by one search with
  the entity's name, and only from the corpus.
- ``task.json``: the arguments and the counts.

Attribute values come from shared pools (about ``n_entities / 4`` cities and employers, 20
professions, 15 colours, 300 years), so a model that never searches can still guess the most
common value. ``task.json`` records that floor: ``heldout_guess_em``, the held-out exact match of
answering every question with the most frequent train answer of its attribute (a few percent).

``sft_episodes`` builds the SFT warm-start data on the SFT entities: the ideal trajectory
``<search>NAME</search>`` -> the real retriever's observation -> ``<answer>GOLD</answer>``. It
teaches the tool format and copying an answer out of an observation, not the train or held-out
answers: no SFT model turn asks about or answers for those entities (they may show up in an
observation as a distractor document, which carries no loss).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from sidpt.env.base import Episode, Turn, run_episode
from sidpt.files import atomic_write
from sidpt.env.search.env import ANSWER_CLOSE, ANSWER_OPEN, SEARCH_CLOSE, SEARCH_OPEN, Question, SearchEnv

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "kr", "st", "th", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m")  # open syllables more often: shorter names
PROFESSIONS = ("astronomer", "baker", "cartographer", "chemist", "composer", "engineer", "farmer",
               "glassblower", "historian", "illustrator", "jeweller", "librarian", "mason", "navigator",
               "potter", "sculptor", "tailor", "translator", "violinist", "weaver")
COLOURS = ("amber", "azure", "crimson", "emerald", "gold", "indigo", "ivory", "lavender", "magenta", "ochre",
           "olive", "scarlet", "silver", "teal", "violet")
EMPLOYER_SUFFIXES = ("Works", "Guild", "Labs", "Foundry", "Holdings", "Trading", "Institute", "Press")
# Template words an invented word must not collide with (it would pollute BM25 and the answers).
TEMPLATE_WORDS = frozenset(
    "what is the birthplace of where was born in year birth profession which company does work for who "
    "employer favourite colour a an at rival and".split()
    + [s.lower() for s in EMPLOYER_SUFFIXES] + list(PROFESSIONS) + list(COLOURS))

TASK_FORMAT = 3  # bump when the generated files change: sidpt.data.prepare_task regenerates older ones
ATTRIBUTES = ("birthplace", "birth_year", "profession", "employer", "colour", "rival")
QUESTION_TEMPLATES = {
    "birthplace": "What is the birthplace of {name}?",
    "birth_year": "In what year was {name} born?",
    "profession": "What is the profession of {name}?",
    "employer": "Which company does {name} work for?",
    "colour": "What is the favourite colour of {name}?",
    "rival": "Who is the rival of {name}?",
}


class _Words:
    """Invented words, unique across the task."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set(TEMPLATE_WORDS)

    def syllable(self) -> str:
        return self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)

    def claim(self, sylls: list[str]) -> str | None:
        w = "".join(sylls)
        if w in self.used or len(w) < 4:
            return None
        self.used.add(w)
        return w.capitalize()

    def new(self, n_min: int = 2, n_max: int = 3) -> tuple[str, list[str]]:
        while True:
            sylls = [self.syllable() for _ in range(self.rng.randint(n_min, n_max))]
            if (w := self.claim(sylls)) is not None:
                return w, sylls

    def variant(self, sylls: list[str]) -> str:
        """A new word one syllable away from ``sylls`` (a near-namesake)."""
        while True:
            s = list(sylls)
            s[self.rng.randrange(len(s))] = self.syllable()
            if (w := self.claim(s)) is not None:
                return w


def make_entities(n_entities: int, seed: int, name_pool: int = 0, n_places: int | None = None) -> list[dict[str, Any]]:
    """``n_entities`` invented people (in namesake pairs), their attributes, and a rival each.

    ``name_pool > 0``: first names and surnames come from two pools of that many invented words
    (every full name still unique, namesake pairs share the first name), so each name word recurs
    across entities, as real names do; 0: every surname is new. ``n_places``: cities and employers
    (default ``n_entities // 4``, at least 8)."""
    rng = random.Random(seed)
    words = _Words(rng)
    n_places = n_places or max(8, n_entities // 4)
    cities = [words.new(2, 2)[0] for _ in range(n_places)]
    employers = [f"{words.new(2, 2)[0]} {rng.choice(EMPLOYER_SUFFIXES)}" for _ in range(n_places)]
    names: list[str] = []
    if name_pool > 0:
        if name_pool * name_pool < n_entities:
            raise ValueError(f"name_pool={name_pool}: {name_pool}^2 full names < n_entities={n_entities}")
        firsts = [words.new(2, 2)[0] for _ in range(name_pool)]
        lasts = [words.new(2, 3)[0] for _ in range(name_pool)]
        taken: set[str] = set()
        while len(names) < n_entities:
            first = rng.choice(firsts)
            for _ in range(2 if len(names) + 1 < n_entities else 1):  # a namesake pair
                while (name := f"{first} {rng.choice(lasts)}") in taken:
                    first = first if rng.random() < 0.9 else rng.choice(firsts)
                taken.add(name)
                names.append(name)
    while len(names) < n_entities:
        first, _ = words.new(2, 2)
        last, sylls = words.new(2, 3)
        names.append(f"{first} {last}")
        if len(names) < n_entities:
            names.append(f"{first} {words.variant(sylls)}")
    people = []
    for i, name in enumerate(names):
        people.append({
            "doc_id": f"e{i:05d}", "name": name, "birthplace": rng.choice(cities),
            "birth_year": str(rng.randint(1700, 1999)), "profession": rng.choice(PROFESSIONS),
            "employer": rng.choice(employers), "colour": rng.choice(COLOURS),
        })
    for i, p in enumerate(people):  # a rival who is not a namesake (those sit at i ^ 1)
        j = i
        while len(people) > 2 and j in (i, i ^ 1):
            j = rng.randrange(len(people))
        p["rival"] = people[j if j != i else (i + 1) % len(people)]["name"]
    return people


def entity_document(p: dict[str, Any]) -> dict[str, str]:
    """One document per entity. Each fact is stated in the words its question uses ("the
    birthplace of X is ...", "X was born in <year>", "X works for ..."), so that answering is
    finding the question's phrase in the result and copying what follows it. The sentences differ
    in shape on purpose: with one template for every fact ("The <attribute> of X is <value>.") a
    1M-parameter model learned to read two attributes of six (held-out EM 6.5% after SFT, 28%
    after 300 GRPO steps, measured), and an SFT on 12,800 entities seen once never learned to
    read at all (loss flat at 0.66 from step 300 to 1500, 3.5% EM)."""
    name = p["name"]
    text = (f"The birthplace of {name} is {p['birthplace']}. {name} was born in {p['birth_year']}. "
            f"The profession of {name} is {p['profession']}. {name} works for {p['employer']}. "
            f"The favourite colour of {name} is {p['colour']}. The rival of {name} is {p['rival']}.")
    return {"id": p["doc_id"], "title": name, "text": text}


def entity_questions(p: dict[str, Any], attributes: tuple[str, ...] = ATTRIBUTES) -> list[dict[str, Any]]:
    rows = []
    for attr in attributes:
        answers = [p[attr]]
        if attr == "employer":  # "Vantrel Works" or just "Vantrel"
            answers.append(p[attr].split()[0])
        question = QUESTION_TEMPLATES[attr].format(name=p["name"])
        rows.append({"id": f"{p['doc_id']}-{attr}", "question": question, "answers": answers,
                     "entity": p["name"], "attribute": attr, "doc_id": p["doc_id"]})
    return rows


def guess_baseline(train: list[dict[str, Any]], heldout: list[dict[str, Any]],
                   attributes: tuple[str, ...] = ATTRIBUTES) -> float:
    """Held-out exact match of a model that never searches and answers each question with the most
    frequent train value of its attribute: the floor that searching has to beat."""
    hits = 0
    for attr in attributes:
        counts = Counter(p[attr] for p in train)
        guess = max(sorted(counts), key=counts.__getitem__)  # sorted: ties break the same way every run
        hits += sum(p[attr] == guess for p in heldout)
    return round(hits / (len(attributes) * len(heldout)), 6)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def check_attributes(attributes) -> tuple[str, ...]:
    """``attributes`` as a tuple; ValueError unless they are distinct names from ATTRIBUTES."""
    attributes = tuple(attributes)
    bad = [a for a in attributes if a not in ATTRIBUTES]
    if bad or not attributes or len(set(attributes)) < len(attributes):
        raise ValueError(f"attributes={list(attributes)}: expected distinct names from {list(ATTRIBUTES)}"
                         + (f"; unknown: {bad}" if bad else ""))
    return attributes


def make_search_task(out_dir: str | os.PathLike, n_entities: int, seed: int = 0, heldout_frac: float = 0.2,
                     sft_frac: float = 0.1, name_pool: int = 0, sft_entities: int = 0,
                     attributes: tuple[str, ...] | list[str] = ATTRIBUTES) -> dict[str, Path]:
    """Write the task files (see the module docstring) into ``out_dir``; returns their paths by name.

    ``sft_entities > 0``: the SFT split is that many *extra* entities (in the corpus too, their
    attribute values from the same pools, so the vocabulary does not grow), with one question
    each, attributes in turn; ``sft_frac`` is then unused. A warm-start that sees every entity
    once cannot memorise facts and has to learn to read them.

    ``attributes``: the attributes questions ask about (every document states all of them)."""
    attributes = check_attributes(attributes)
    if n_entities < 3:
        raise ValueError(f"n_entities={n_entities}: need at least 3 (one per split)")
    if sft_entities < 0:
        raise ValueError(f"sft_entities={sft_entities}: must be >= 0")
    if sft_entities:
        sft_frac = 0.0
    if not (0 < heldout_frac and (0 < sft_frac or sft_entities) and heldout_frac + sft_frac < 1):
        raise ValueError(f"heldout_frac={heldout_frac}, sft_frac={sft_frac}: need both > 0 and a sum < 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    people = make_entities(n_entities + sft_entities, seed, name_pool, max(8, n_entities // 4))
    order = list(range(n_entities))
    random.Random(seed + 1).shuffle(order)
    n_held = max(1, round(heldout_frac * n_entities))
    n_sft = 0 if sft_entities else max(1, round(sft_frac * n_entities))  # SFT entities from the main pool
    split = {"heldout": order[:n_held], "sft": order[n_held: n_held + n_sft], "train": order[n_held + n_sft:]}
    paths = {name: out / f"{name}.jsonl" for name in ("corpus", "train", "heldout", "sft")}
    _write_jsonl(paths["corpus"], [entity_document(p) for p in people])
    for name, idx in split.items():
        if name == "sft" and sft_entities:
            rows = [entity_questions(people[i], attributes)[(i - n_entities) % len(attributes)]
                    for i in range(n_entities, n_entities + sft_entities)]
        else:
            rows = [row for i in sorted(idx) for row in entity_questions(people[i], attributes)]
        _write_jsonl(paths[name], rows)
    meta = {"format": TASK_FORMAT, "n_entities": n_entities, "seed": seed, "heldout_frac": heldout_frac,
            "sft_frac": sft_frac, "name_pool": name_pool, "sft_entities": sft_entities,
            "attributes": list(attributes), **{f"n_{k}_entities": len(v) for k, v in split.items()},
            "heldout_guess_em": guess_baseline([people[i] for i in split["train"]],
                                               [people[i] for i in split["heldout"]], attributes)}
    if sft_entities:
        meta["n_sft_entities"] = sft_entities
    paths["task"] = out / "task.json"
    paths["task"].write_text(json.dumps(meta, indent=1) + "\n")
    return paths


def ideal_policy(q: Question):
    """The ideal trajectory's scripted policy: search the entity's name, then give the first gold answer."""
    query = q.meta.get("entity", q.question)

    def policy(turns: list[Turn]) -> str:
        if not turns:
            return f"{SEARCH_OPEN}{query}{SEARCH_CLOSE}"
        return f"{ANSWER_OPEN}{q.answers[0]}{ANSWER_CLOSE}"

    return policy


def sft_episodes(env: SearchEnv, questions: list[Question]) -> list[Episode]:
    """Ideal trajectories for SFT warm-start: search the name, answer from the observation.

    Run through ``env`` itself, so the observations are exactly what RL will show. Kept only where
    the answer is in the observation text (the answer was copyable) and the episode scores 1:
    the data must never teach answering something the observation does not say."""
    out = []
    for q in questions:
        ep = run_episode(env, q, ideal_policy(q))
        obs = "".join(t.text for t in ep.turns if not t.generated)
        if ep.reward == 1.0 and ep.info["n_searches"] == 1 and q.answers[0] in obs:
            out.append(ep)
    return out
