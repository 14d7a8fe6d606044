"""The search environment: ``<search>query</search>`` -> BM25 top-k, ``<answer>...</answer>`` -> EM/F1.

Protocol of one model turn (the engine stops on ``STOP_STRINGS``, so a turn normally ends with one
closing tag):

- The action is the **first complete action** of the turn: the first closing tag (``</search>``
  or ``</answer>``) that has a matching opening tag before it; its content runs from the last such
  opening tag. Text order of the closing tags decides between a search and an answer in the same
  turn, which is also where the engine would have stopped.
- ``<search>q</search>``: the observation is ``\\n\\n<information>Doc 1(Title: t) text\\nDoc 2(...)
  ...</information>\\n\\n`` (Search-R1's format) for the top ``topk`` BM25 documents of ``q``
  (truncated to ``max_query_chars``).
- ``<answer>a</answer>``: the episode ends; reward = exact match (or token F1) of ``a``.
- Malformed calls never raise: an unclosed tag, a closing tag with no opening tag, or an empty
  query gets a **corrective observation** (also inside ``<information>``) and costs a turn. A
  turn with no tag at all ends the episode with reward 0 (finish ``no_action``).
- **Turn budget**: every observation (search result or correction) costs one of ``max_turns``
  turns. A tool call (or malformed call) once the budget is spent ends the episode with reward 0
  and finish ``tool_limit`` (as Search-R1, whose last round does not execute searches); an answer
  is always accepted. So an episode takes at most ``max_turns + 1`` model turns.

Observations are text; the controller tokenizes them and masks them out of the loss (see
``sidpt.env.base``). ``info["retrieved"]`` lists the ids of every document shown, in order.
Errors are counted per kind in ``info`` (``err_<kind>``, see ``ERROR_KINDS``) and in total
(``n_errors``); a turn may carry more than one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sidpt.env.base import EnvState, StepResult
from sidpt.errors import ConfigError
from sidpt.env.search.bm25 import BM25, Doc, jsonl_rows, load_bm25, parse_rows, tokenize, utf8_text
from sidpt.env.search.scoring import exact_match, token_f1

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)

_TAG_RE = re.compile(r"<(/?)(search|answer|information)>")
_MAX_INFO_ANSWER = 256  # characters of the answer kept in info (for logs); scoring sees all of it

ERROR_KINDS = (
    "unclosed",  # an opening tag and no complete action
    "unopened",  # a closing tag and no complete action
    "empty",  # a search with no letters or digits, or an empty answer
    "truncated",  # a query longer than max_query_chars (it is cut, and still run)
    "extra_tags",  # tags beyond the action's own pair: nested, repeated, a second action, <information>
)

_RETRY = f"Write {SEARCH_OPEN}query{SEARCH_CLOSE} to search or {ANSWER_OPEN}answer{ANSWER_CLOSE} to answer."
CORRECTIONS = {
    "unclosed": f"Invalid action: a tag was not closed. {_RETRY}",
    "unopened": f"Invalid action: a closing tag has no opening tag. {_RETRY}",
    "empty": f"Invalid action: the search query is empty. {_RETRY}",
}
NO_RESULTS = "No documents found."

INSTRUCTION = (
    "Answer the question. To look something up, write " + SEARCH_OPEN + "query" + SEARCH_CLOSE
    + "; the results come back between " + INFO_OPEN + " and " + INFO_CLOSE + ". When you know the "
    "answer, write " + ANSWER_OPEN + "answer" + ANSWER_CLOSE + " with a short answer, for example "
    + ANSWER_OPEN + "Paris" + ANSWER_CLOSE + ".\nQuestion: {question}\n"
)


class DataError(ValueError):
    """A question row is malformed; the message names the file and line."""


# ---------------------------------------------------------------------------------------------
# Questions


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]  # gold answers; any one of them scores
    meta: dict[str, Any] = field(default_factory=dict)  # other fields of the row (e.g. entity)
    where: str = ""  # "file:line" it was read from (for error messages)


def _question_text(row: dict) -> Any:
    if "question" in row:
        return row["question"]
    prompt = row.get("prompt")  # Search-R1 parquet rows: [{"role": "user", "content": template}]
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    if isinstance(prompt, str):  # the template ends "Question: {question}\n"
        return prompt.rpartition("Question:")[2].strip() if "Question:" in prompt else prompt.strip()
    return None


def _answers(row: dict) -> Any:
    for key in ("answers", "golden_answers"):
        if key in row:
            return row[key]
    rm = row.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    if isinstance(gt, dict):
        return gt.get("target")
    return gt


def as_question(row: Any, where: str = "<row>", default_id: str = "") -> Question:
    """Normalise a row: sidpt ``{"id", "question", "answers"}``, FlashRAG / Search-R1
    ``{"id", "question", "golden_answers"}`` or Search-R1's parquet layout (the question after the
    last ``Question:`` of ``prompt[-1].content``, answers under ``reward_model.ground_truth.target``)."""
    if isinstance(row, Question):
        return row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    q = _question_text(row)
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: no question (expected a non-empty string 'question', or Search-R1's "
                        f"'prompt')")
    ans = _answers(row)
    if isinstance(ans, (str, int, float)) and not isinstance(ans, bool):
        ans = [ans]
    if not isinstance(ans, list) or not ans or not all(
            isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in ans):
        raise DataError(f"{where}: expected a non-empty list of answers under 'answers', 'golden_answers' or "
                        f"'reward_model.ground_truth.target', got {ans!r}")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    qid = row.get("id", extra.get("index", default_id))
    meta = {k: v for k, v in row.items() if k not in ("id", "question", "answers", "golden_answers")}
    return Question(str(qid), q.strip(), [str(a) for a in ans], meta, where)


def load_questions(path: str | os.PathLike, skipped: list[str] | None = None) -> list[Question]:
    """Questions from a JSONL file, or a ``.parquet`` file (with pyarrow), in any layout ``as_question``
    accepts (ids default to the line or row number). A malformed row raises naming file and line,
    or with ``skipped`` (``env.bad_rows = "skip"``) is recorded there and left out."""
    if Path(path).suffix == ".parquet":  # Search-R1 ships its questions as parquet
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'sidpt[searchr1]')") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        return parse_rows(((f"{path}:row {i}", row) for i, row in enumerate(rows, 1)),
                          lambda row, where: as_question(row, where, default_id=where.rsplit(" ", 1)[1]), DataError,
                          skipped)
    text = utf8_text(Path(path).read_bytes(), path, DataError)
    return parse_rows(jsonl_rows(text, path, DataError, skipped),
                      lambda row, where: as_question(row, where, default_id=where.rsplit(":", 1)[1]), DataError, skipped)


# ---------------------------------------------------------------------------------------------
# Prompts


def format_prompt(question: str, template: str = INSTRUCTION) -> str:
    """The instruction and question as one text: a raw-text prompt, or a chat user message."""
    return template.format(question=question)


def prompt_messages(question: str, template: str = INSTRUCTION) -> list[dict[str, str]]:
    """One user message for ``Tokenizer.apply_chat_template(..., add_generation_prompt=True)``."""
    return [{"role": "user", "content": format_prompt(question, template)}]


# ---------------------------------------------------------------------------------------------
# Parsing a model turn


@dataclass
class Action:
    kind: Literal["search", "answer", "invalid", "none"]
    content: str = ""  # the query or answer, outer whitespace and stray tags removed
    errors: tuple[str, ...] = ()  # from ERROR_KINDS


def parse_action(text: str) -> Action:
    """The first complete action of a model turn (rules in the module docstring); one pass over the tags."""
    tags = list(_TAG_RE.finditer(text))
    extra = ("extra_tags",) if len(tags) > 2 else ()
    content_start: dict[str, int] = {}  # action name -> end of its latest opening tag
    for m in tags:
        closing, name = m.group(1) == "/", m.group(2)
        if name == "information":
            continue
        if not closing:
            content_start[name] = m.end()
        elif name in content_start:
            raw = text[content_start[name]: m.start()]
            return Action(name, " ".join(_TAG_RE.sub(" ", raw).split()), extra)
    if content_start:
        return Action("invalid", "", ("unclosed",))
    if any(m.group(2) != "information" for m in tags):
        return Action("invalid", "", ("unopened",))
    return Action("none", "", ("extra_tags",) if tags else ())


def format_docs(hits: list[tuple[Doc, float]], max_doc_chars: int = 0) -> str:
    """Search-R1's passage list: ``Doc i(Title: title) text`` one per line (text cut at max_doc_chars)."""
    lines = []
    for i, (doc, _) in enumerate(hits, 1):
        text = doc.text[:max_doc_chars] if max_doc_chars > 0 else doc.text
        lines.append(f"Doc {i}(Title: {doc.title}) {text}")
    return "\n".join(lines)


def wrap_observation(body: str) -> str:
    """Search-R1's framing: blank lines around ``<information>`` so the model's next turn starts fresh."""
    return f"\n\n{INFO_OPEN}{body.strip()}{INFO_CLOSE}\n\n"


# ---------------------------------------------------------------------------------------------
# The environment


@dataclass
class SearchEnvConfig:
    corpus: str = ""
    """JSONL corpus (``{"id", "title", "text"}`` or Search-R1's ``{"id", "contents"}``); its BM25
    index is cached beside it as ``<corpus>.bm25.json``."""
    topk: int = 3
    """Documents returned per search."""
    max_turns: int = 4
    """Observations (search results and corrections) per episode; a tool call beyond ends it with reward 0."""
    reward: Literal["em", "f1"] = "em"
    """Episode reward of an answer: exact match or token F1 (SQuAD-normalised) against the gold answers."""
    max_query_chars: int = 512
    """Longer queries are cut to this many characters (and counted as an error)."""
    max_doc_chars: int = 600
    """Each returned document's text is cut to this many characters (0: no cut)."""
    k1: float = 1.2
    """BM25 term-frequency saturation."""
    b: float = 0.75
    """BM25 length normalisation."""
    bad_rows: Literal["error", "skip"] = "error"
    """A malformed row in the corpus or a question file (invalid JSON, a missing field): stop with
    its file and line (error), or leave it out, count it and list it in the run directory's
    ``skipped_rows.txt`` (skip)."""

    def validate(self) -> None:
        for key in ("topk", "max_turns", "max_query_chars"):
            if getattr(self, key) < 1:
                raise ConfigError(f"env.{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_doc_chars < 0:
            raise ConfigError(f"env.max_doc_chars: must be >= 0, got {self.max_doc_chars}")
        if self.reward not in ("em", "f1"):
            raise ConfigError(f"env.reward: expected 'em' or 'f1', got {self.reward!r}")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ConfigError(f"env.k1/env.b: need k1 >= 0 and 0 <= b <= 1, got {self.k1}, {self.b}")


class SearchEnv:
    """Multi-turn BM25 search over a corpus; implements ``sidpt.env.base.Env``."""

    stop_strings = STOP_STRINGS

    def __init__(self, config: SearchEnvConfig, retriever: BM25 | None = None):
        config.validate()
        self.skipped_rows: list[str] = []  # malformed corpus rows left out (bad_rows = "skip")
        if retriever is None:
            if not config.corpus:
                raise ValueError("env.corpus: a corpus path is needed when no retriever is given")
            retriever = load_bm25(config.corpus, config.k1, config.b,
                                  skipped=self.skipped_rows if config.bad_rows == "skip" else None)
        self.cfg, self.retriever = config, retriever

    def reset(self, sample: Any) -> EnvState:
        info: dict[str, Any] = {"n_turns": 0, "n_searches": 0, "n_errors": 0, "retrieved": []}
        info.update({f"err_{k}": 0 for k in ERROR_KINDS})
        info.update({"finish": None, "answer": None, "em": 0.0, "f1": 0.0, "action": None})
        return EnvState(as_question(sample), info=info)

    def search(self, query: str) -> str:
        """The observation text for one query."""
        return self._search(query)[0]

    def _search(self, query: str) -> tuple[str, list[str]]:
        hits = self.retriever.search(query, self.cfg.topk)
        text = wrap_observation(format_docs(hits, self.cfg.max_doc_chars) if hits else NO_RESULTS)
        return text, [doc.id for doc, _ in hits]

    def step(self, state: EnvState, model_text: str) -> StepResult:
        if state.done:
            raise ValueError("step() on a finished episode")
        if not isinstance(model_text, str):
            model_text = str(model_text)
        act = parse_action(model_text)
        info = state.info
        info["action"] = act.kind
        errors = list(act.errors)
        if act.kind == "answer":
            q: Question = state.sample
            if not act.content:
                errors.append("empty")
            info["answer"] = act.content[:_MAX_INFO_ANSWER]
            info["em"] = exact_match(act.content, q.answers)
            info["f1"] = token_f1(act.content, q.answers)
            return self._finish(state, errors, "answer", info[self.cfg.reward])
        if act.kind == "none":
            return self._finish(state, errors, "no_action", 0.0)
        if state.turn >= self.cfg.max_turns:
            return self._finish(state, errors, "tool_limit", 0.0)
        if act.kind == "search":
            query = act.content
            if len(query) > self.cfg.max_query_chars:
                errors.append("truncated")
                query = query[: self.cfg.max_query_chars]
            if tokenize(query):
                info["n_searches"] += 1
                obs, ids = self._search(query)
                info["retrieved"] = info["retrieved"] + ids  # a new list: StepResult infos stay snapshots
            else:
                errors.append("empty")
                obs = wrap_observation(CORRECTIONS["empty"])
        else:  # invalid: a correction for its (single) error
            obs = wrap_observation(CORRECTIONS[act.errors[0]])
        state.turn += 1
        info["n_turns"] = state.turn
        self._count(info, errors)
        return StepResult(obs, False, 0.0, dict(info))

    def end(self, state: EnvState, finish: str) -> StepResult:
        if state.done:
            raise ValueError("end() on a finished episode")
        return self._finish(state, [], finish, 0.0)

    def _count(self, info: dict, errors: list[str]) -> None:
        for e in errors:
            info[f"err_{e}"] += 1
        info["n_errors"] += len(errors)

    def _finish(self, state: EnvState, errors: list[str], finish: str, reward: float) -> StepResult:
        self._count(state.info, errors)
        state.done = True
        state.info["finish"] = finish
        return StepResult(None, True, float(reward), dict(state.info))
