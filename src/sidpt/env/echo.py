"""Copy a string whose length is long-tailed: the async pipeline's task (single turn, no files).

    task = make_task(Config(), is_main=True, need_sft=True)
    p = task.train[0]                       # Problem(id="e17", letters=("c", "a", "h"))
    task.prompt(p)                          # "Copy c a h . Answer:"
    res = task.env.step(task.env.reset(p), " c a h")   # res.reward == 1.0

Why this task: an async RL pipeline is unfair when response lengths vary a lot (short responses
finish first; a trainer that takes whatever finished first trains on them more), and the bias is
a difficulty bias when long responses are also the hard ones. Here both hold by construction: the
answer of a problem with ``L`` letters is ``L`` tokens and EOS, ``L`` is drawn log-uniformly from
``min_len..max_len`` (defaults 1..48: response lengths p90 / p10 >= 8, measured in
tests/env/test_echo.py), and a small model copies long strings worse than short ones.

**Problems** are drawn from ``seed`` alone (held-out, then SFT, then train, all distinct strings).
Letters are separate words (one token each for a word-level task tokenizer).

**Reward**: 1.0 for the exact copy; otherwise ``partial_reward`` times the share of positions
that match (over the longer of the two), so GRPO groups of a weak model are unequal. A turn is
parsed by dropping trailing special tokens and one trailing "."; any non-letter word makes it
``no_action`` (reward 0). ``info``: ``finish``, ``correct``, ``length`` (the problem's ``L``).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidpt.env.base import EnvState, Episode, StepResult, run_episode
from sidpt.errors import ConfigError

_TRAILING_SPECIAL = re.compile(r"(?:\s*<[^<>\s]{1,40}>)+\s*$")


@dataclass
class Config:
    """``[env]`` of ``name = "echo"``."""

    min_len: int = 1
    """Shortest string to copy (letters)."""
    max_len: int = 48
    """Longest string to copy; lengths are log-uniform over min_len..max_len (a long tail)."""
    alphabet: int = 12
    """Letters drawn from the first ``alphabet`` of a..z."""
    n_train: int = 2000
    """Train problems (the prompts RL samples from)."""
    n_heldout: int = 100
    """Held-out problems, disjoint from train and SFT."""
    n_sft: int = 1000
    """SFT warm-start problems, disjoint from train and held-out (always reserved)."""
    seed: int = 0
    """Seed of the problems (independent of run.seed)."""
    partial_reward: float = 0.5
    """Reward of an inexact copy, times the share of matching positions (an exact one scores 1)."""
    tokenizer_dir: str = "runs/echo-tokenizer"
    """Where a random-init model's task tokenizer is cached (a sub-directory named by a digest of
    the task's texts, as for ``arith``)."""

    def validate(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError(f"env.min_len={self.min_len}, env.max_len={self.max_len}: need 1 <= min_len <= max_len")
        if not 2 <= self.alphabet <= 26:
            raise ConfigError(f"env.alphabet={self.alphabet}: must be in 2..26")
        for key, lo in (("n_train", 1), ("n_heldout", 1), ("n_sft", 0)):
            if getattr(self, key) < lo:
                raise ConfigError(f"env.{key}={getattr(self, key)}: must be >= {lo}")
        if not 0 <= self.partial_reward < 1:
            raise ConfigError(f"env.partial_reward={self.partial_reward}: must be in [0, 1)")
        distinct = sum(self.alphabet ** n for n in range(self.min_len, min(self.max_len, 6) + 1))
        if self.max_len < 6 and self.n_train + self.n_heldout + self.n_sft > distinct:
            raise ConfigError(f"env.n_train={self.n_train}: n_train + n_heldout + n_sft exceeds the {distinct} "
                              f"distinct strings of lengths {self.min_len}..{self.max_len}")


@dataclass(frozen=True)
class Problem:
    id: str
    letters: tuple[str, ...]
    where: str = ""  # generated, not read from a file


def draw_length(rng: random.Random, lo: int, hi: int) -> int:
    """Log-uniform on lo..hi: as many problems of 1-2 letters as of 24-48."""
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def make_problems(cfg: Config) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, heldout, sft), deterministic for ``cfg``; distinct strings throughout."""
    rng, letters = random.Random(cfg.seed), [chr(ord("a") + i) for i in range(cfg.alphabet)]
    seen, out = set(), []
    while len(out) < cfg.n_heldout + cfg.n_sft + cfg.n_train:
        s = tuple(rng.choice(letters) for _ in range(draw_length(rng, cfg.min_len, cfg.max_len)))
        if s not in seen:
            seen.add(s)
            out.append(Problem(f"e{len(out)}", s))
    h, s = cfg.n_heldout, cfg.n_heldout + cfg.n_sft
    return out[s:], out[:h], out[h:s]


def format_prompt(p: Problem) -> str:
    return f"Copy {' '.join(p.letters)} . Answer:"


def answer_text(p: Problem) -> str:
    return " " + " ".join(p.letters)


def parse_copy(text: Any) -> tuple[str, ...] | None:
    """The letters a model turn states, or None when it holds anything else; never raises."""
    t = _TRAILING_SPECIAL.sub("", text if isinstance(text, str) else str(text)).strip()
    if t.endswith("."):
        t = t[:-1]
    words = t.split()
    return tuple(words) if words and all(len(w) == 1 and "a" <= w <= "z" for w in words) else None


def score(pred: tuple[str, ...] | None, gold: tuple[str, ...], partial_reward: float) -> float:
    if pred is None:
        return 0.0
    if pred == gold:
        return 1.0
    return partial_reward * sum(a == b for a, b in zip(pred, gold)) / max(len(pred), len(gold))


class EchoEnv:
    """Single-turn: the model's turn is the copy; implements ``sidpt.env.base.Env``."""

    stop_strings: tuple[str, ...] = ()

    def __init__(self, partial_reward: float = 0.5):
        self.partial_reward = partial_reward

    def reset(self, sample: Problem) -> EnvState:
        return EnvState(sample, info={"finish": None, "correct": 0, "length": len(sample.letters)})

    def step(self, state: EnvState, model_text: str) -> StepResult:
        if state.done:
            raise ValueError("step() on a finished episode")
        pred, gold = parse_copy(model_text), state.sample.letters
        state.done = True
        state.info.update(finish="answer" if pred is not None else "no_action", correct=int(pred == gold))
        return StepResult(None, True, score(pred, gold, self.partial_reward), dict(state.info))

    def end(self, state: EnvState, finish: str) -> StepResult:
        if state.done:
            raise ValueError("end() on a finished episode")
        state.done = True
        state.info.update(finish=finish, correct=0)
        return StepResult(None, True, 0.0, dict(state.info))


class EchoTask:
    """The copy task behind ``sidpt.env.base.Task``."""

    eval_columns = (("accuracy", "accuracy %"), ("accuracy_long", "accuracy L>=12 %"),
                    ("response_tokens", "response tokens"))

    def __init__(self, cfg: Config):
        cfg.validate()
        self.cfg = cfg
        self.train, self.heldout, self.sft = make_problems(cfg)
        self.env = EchoEnv(cfg.partial_reward)
        texts, special = self.tokenizer_texts()
        digest = hashlib.sha1("\n".join([*texts, "", *special]).encode()).hexdigest()[:12]
        self.tokenizer_dir = Path(cfg.tokenizer_dir) / f"texts-{digest}"

    def prompt(self, sample: Problem) -> str:
        return format_prompt(sample)

    def sft_episodes(self, n: int, seed: int) -> list[Episode]:
        problems = list(self.sft)
        random.Random(seed).shuffle(problems)
        return [run_episode(self.env, p, lambda turns, p=p: answer_text(p)) for p in problems[:n]]

    def tokenizer_texts(self) -> tuple[list[str], list[str]]:
        texts = [t for p in (*self.train, *self.heldout, *self.sft) for t in (format_prompt(p), answer_text(p))]
        texts.append(" ".join(chr(ord("a") + i) for i in range(self.cfg.alphabet)))
        return texts, []

    def metrics(self, episodes: list) -> dict[str, tuple[float, float]]:
        n, long = float(len(episodes)), [e for e in episodes if e.info.get("length", 0) >= 12]
        return {
            "accuracy": (100.0 * sum(e.info.get("correct", 0) for e in episodes), n),
            "accuracy_long": (100.0 * sum(e.info.get("correct", 0) for e in long), float(len(long))),
            "response_tokens": (float(sum(sum(e.out.generated) for e in episodes)), n),
        }

    def example(self, episode: Any, response: str) -> dict[str, Any]:
        p, info = episode.sample, episode.info
        return {"id": p.id, "prompt": self.prompt(p), "gold": answer_text(p).strip(), "correct": info.get("correct", 0),
                "reward": episode.reward, "finish": info.get("finish"), "response": response}


def make_task(cfg: Config, is_main: bool, need_sft: bool) -> EchoTask:
    """No files are written (the problems come from the seed)."""
    return EchoTask(cfg)


__all__ = ["Config", "EchoEnv", "EchoTask", "Problem", "make_problems", "make_task", "parse_copy", "score"]
