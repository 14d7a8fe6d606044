"""The search environment as a task (``sidpt.env.base.Task``): multi-turn BM25 search over a corpus.

- ``env``: ``SearchEnv`` (``<search>`` / ``<information>`` / ``<answer>``), questions, prompts.
- ``bm25``: JSONL corpus, Okapi BM25 (k1=1.2, b=0.75, Lucene IDF), index cached beside the corpus.
- ``scoring``: SQuAD-normalised exact match and token F1.
- ``task``: ``make_search_task`` (invented people, namesake distractors, entity-disjoint splits)
  and ``sft_episodes`` (ideal trajectories on SFT-only entities).
- ``data``: the task directory (generated or the user's own), SFT question choice.

    env = SearchEnv(SearchEnvConfig(corpus="task/corpus.jsonl"))
    state = env.reset(load_questions("task/train.jsonl")[0])
    res = env.step(state, "<search>Zorvath Kellimar</search>")   # res.observation: <information>...
    res = env.step(state, "<answer>Quorbin</answer>")            # res.done, res.reward in {0, 1}

Statistics (``SearchTask.metrics``): exact match, F1, searches, tool-call errors, answered share,
and, where the task names each question's gold document (``doc_id``), how often a search
retrieved it: where the agent fails, searching or reading.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from sidpt.dist.world import barrier
from sidpt.env.base import Episode
from sidpt.env.search.data import TAGS, prepare_task, spread_questions, tokenizer_texts
from sidpt.env.search.env import INSTRUCTION, Question, SearchEnv, SearchEnvConfig, format_prompt, load_questions
from sidpt.env.search.task import ATTRIBUTES, check_attributes, sft_episodes
from sidpt.errors import ConfigError


@dataclass
class Config(SearchEnvConfig):
    """``[env]`` of ``name = "search"``: the environment (``SearchEnvConfig``) and its task."""

    dir: str = "runs/task"
    """Task directory. Missing or empty: sidpt generates a task there (the keys below); one sidpt
    generated (it has task.json) is regenerated when those keys change; any other is your own
    task, read and never written: corpus.jsonl, train.jsonl, heldout.jsonl, and sft.jsonl when
    sft.steps > 0. An empty ``corpus`` means the task's corpus.jsonl."""
    n_entities: int = 300
    """Entities in a generated task."""
    seed: int = 0
    """Seed of the generated task (independent of run.seed)."""
    name_pool: int = 0
    """Invented first names and surnames each come from a pool of this size (0: every surname new)."""
    sft_frac: float = 0.1
    """Share of a generated task's entities whose questions form the SFT split (disjoint from
    train and held-out entities); unused when ``sft_entities`` > 0."""
    sft_entities: int = 0
    """Extra entities, one SFT question each, for the SFT split (0: use ``sft_frac``). Seen once
    each, their facts cannot be memorised, so the warm-start learns to read results."""
    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    """Attributes a generated task's questions ask about (every document states all six:
    birthplace, birth_year, profession, employer, colour, rival)."""
    prompt: str = ""
    """Prompt template with ``{question}`` (empty: the environment's full tool instruction)."""

    def validate(self) -> None:
        super().validate()
        try:
            check_attributes(self.attributes)
        except ValueError as e:
            raise ConfigError(f"env.{e}") from None
        for key, lo in (("n_entities", 1), ("name_pool", 0), ("sft_entities", 0)):
            if getattr(self, key) < lo:
                raise ConfigError(f"env.{key}={getattr(self, key)}: must be >= {lo}")
        if not 0 <= self.sft_frac < 1:
            raise ConfigError(f"env.sft_frac={self.sft_frac}: must be in [0, 1)")
        if self.prompt and "{question}" not in self.prompt:
            raise ConfigError(f"env.prompt={self.prompt!r}: the template needs a {{question}} field")


class SearchTask:
    """The search task behind ``sidpt.env.base.Task``."""

    eval_columns = (("exact_match", "exact match %"), ("f1", "F1 %"), ("searches", "searches / question"),
                    ("response_tokens", "response tokens"), ("retrieval_hit", "gold doc retrieved %"))

    def __init__(self, cfg: Config, is_main: bool, need_sft: bool):
        self.cfg = cfg
        self.files = prepare_task(cfg.dir, cfg.n_entities, cfg.seed, is_main, cfg.sft_frac, cfg.name_pool,
                                  cfg.sft_entities, tuple(cfg.attributes), need_sft=need_sft)
        env_cfg = SearchEnvConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SearchEnvConfig)})
        env_cfg.corpus = cfg.corpus or str(self.files["corpus"])
        if is_main:
            SearchEnv(env_cfg)  # builds the BM25 cache once, before the other ranks read it
        barrier()
        self.env = SearchEnv(env_cfg)
        skip = [] if cfg.bad_rows == "skip" else None
        self.train, self.heldout = load_questions(self.files["train"], skip), load_questions(self.files["heldout"], skip)
        self.sft = load_questions(self.files["sft"], skip) if need_sft else []  # read now: a bad row stops the start
        self.skipped_rows = self.env.skipped_rows + (skip or [])  # reported and listed by the controller
        self.tokenizer_dir = self.files["corpus"].parent
        self.template = cfg.prompt or INSTRUCTION

    def prompt(self, sample: Question) -> str:
        return format_prompt(sample.question, self.template)

    def sft_episodes(self, n: int, seed: int) -> list[Episode]:
        return sft_episodes(self.env, spread_questions(self.sft, n, seed))

    def tokenizer_texts(self) -> tuple[list[str], list[str]]:
        return tokenizer_texts(self.files, skip_bad=self.cfg.bad_rows == "skip"), list(TAGS)

    def metrics(self, episodes: list) -> dict[str, tuple[float, float]]:
        n = float(len(episodes))
        info = [e.info for e in episodes]
        docs = [e.sample.meta.get("doc_id") for e in episodes]
        known = [(d, i) for d, i in zip(docs, info) if d is not None]
        return {
            "exact_match": (100 * sum(i.get("em", 0.0) for i in info), n),
            "f1": (100 * sum(i.get("f1", 0.0) for i in info), n),
            "searches": (float(sum(i.get("n_searches", 0) for i in info)), n),
            "errors": (float(sum(i.get("n_errors", 0) for i in info)), n),
            "answered": (float(sum(i.get("finish") == "answer" for i in info)), n),
            "response_tokens": (float(sum(sum(e.out.generated) for e in episodes)), n),
            "retrieval_hit": (100.0 * sum(d in i.get("retrieved", ()) for d, i in known), float(len(known))),
        }

    def example(self, episode: Any, response: str) -> dict[str, Any]:
        q, info = episode.sample, episode.info
        return {"id": q.id, "question": q.question, "gold": q.answers, "answer": info.get("answer"),
                "reward": episode.reward, "retrieved": info.get("retrieved"), **q.meta, "text": response}


def make_task(cfg: Config, is_main: bool, need_sft: bool) -> SearchTask:
    return SearchTask(cfg, is_main, need_sft)


__all__ = ["Config", "SearchEnv", "SearchEnvConfig", "SearchTask", "make_task"]
