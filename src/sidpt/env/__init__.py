"""Environments: the text-level multi-turn protocol, BM25 search, answer scoring, a synthetic search task.

- ``base``: ``Env`` (``reset`` / ``step`` / ``end`` / ``stop_strings``), ``EnvState``,
  ``StepResult``; ``run_episode`` drives an env with a Python policy; ``encode_turns`` gives ids
  and the loss mask (observations 0). Environments speak text; the controller tokenizes.
- ``bm25``: JSONL corpus, Okapi BM25 (k1=1.2, b=0.75, Lucene IDF), index cached beside the corpus.
- ``scoring``: SQuAD-normalised exact match and token F1.
- ``search``: ``SearchEnv`` (``<search>`` / ``<information>`` / ``<answer>``), ``load_questions``
  (sidpt and Search-R1 layouts), prompts.
- ``task``: ``make_search_task`` (invented people, namesake distractors, entity-disjoint splits)
  and ``sft_episodes`` (ideal trajectories on SFT-only entities).

    env = SearchEnv(SearchEnvConfig(corpus="task/corpus.jsonl"))
    state = env.reset(load_questions("task/train.jsonl")[0])
    res = env.step(state, "<search>Zorvath Kellimar</search>")   # res.observation: <information>...
    res = env.step(state, "<answer>Quorbin</answer>")            # res.done, res.reward in {0, 1}
"""

from sidpt.env.base import FINISH_CODES, Env, EnvState, Episode, StepResult, Turn, encode_turns, run_episode
from sidpt.env.bm25 import BM25, CorpusError, Doc, load_bm25, load_corpus, tokenize
from sidpt.env.scoring import exact_match, normalize_answer, token_f1
from sidpt.env.search import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    ERROR_KINDS,
    INFO_CLOSE,
    INFO_OPEN,
    INSTRUCTION,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    STOP_STRINGS,
    Action,
    DataError,
    Question,
    SearchEnv,
    SearchEnvConfig,
    as_question,
    format_prompt,
    load_questions,
    parse_action,
    prompt_messages,
)
from sidpt.env.task import ATTRIBUTES, make_search_task, sft_episodes

__all__ = [
    "ANSWER_CLOSE", "ANSWER_OPEN", "ATTRIBUTES", "BM25", "ERROR_KINDS", "FINISH_CODES", "INFO_CLOSE",
    "INFO_OPEN", "INSTRUCTION", "SEARCH_CLOSE", "SEARCH_OPEN", "STOP_STRINGS", "Action", "CorpusError",
    "DataError", "Doc", "Env", "EnvState", "Episode", "Question", "SearchEnv", "SearchEnvConfig",
    "StepResult", "Turn", "as_question", "encode_turns", "exact_match", "format_prompt", "load_bm25",
    "load_corpus", "load_questions", "make_search_task", "normalize_answer", "parse_action",
    "prompt_messages", "run_episode", "sft_episodes", "token_f1", "tokenize",
]
