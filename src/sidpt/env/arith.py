"""Integer arithmetic with a programmatic reward: the second environment (single turn, no files).

    task = make_task(Config(max_operand=99, ops=["+", "-"]), is_main=True, need_sft=True)
    p = task.train[0]                       # Problem(id="23+45", a=23, op="+", b=45, answer=68)
    task.prompt(p)                          # "Compute 2 3 + 4 5 . Answer:"
    state = task.env.reset(p)
    res = task.env.step(state, "6 8")       # res.done, res.reward == 1.0, res.info["correct"] == 1

**Problems** ``a <op> b`` with ``a, b`` in ``0..max_operand`` and ``op`` one of ``ops`` (+, -, *)
are drawn from ``seed`` alone (``random.Random(seed)``): first the held-out problems, then the SFT
problems, then the train problems, each distinct from every earlier one. Distinct means a
different ``(a, op, b)`` and, for the commutative + and *, not the swapped pair either: no
held-out problem is ``b + a`` of a train problem. Drawing held-out first keeps the held-out set
the same when ``n_train`` or ``n_sft`` change, and the SFT problems are always reserved (also when
the run has no SFT) so that ``sft.steps`` never changes the train set.

**Digits are separate words.** A random-init model reads a word-level tokenizer trained on
``tokenizer_texts`` (whitespace and punctuation split), so "68" would be one token and every number
its own embedding: the model would have to learn each sum as an unrelated symbol, and a held-out
problem asks for a (token, token) -> token association it has never seen. Written digit by digit
("6 8"), every number is spelled with the same 10 tokens (plus "-"): the vocabulary stays ~20 words
whatever ``max_operand`` is, and a held-out problem is made of digit sub-problems (units digits
3 + 5, a carry) that the train problems cover many times over, which is what lets held-out accuracy
follow train accuracy. Measured with ``configs/arith.toml`` (sums of 0..49, debug model, same
budget, seed 0): digit by digit, held-out accuracy 30% after SFT -> 64% after GRPO; one token
per number (108-word vocabulary), 11% -> 7%. Answers are written most significant digit first,
as numbers are read (least-significant-first may be easier for a tiny model, but the answer text
should be the number). ``spaced_digits = false`` writes "68" for a pretrained model's own tokenizer; the
parser accepts both.

**Parsing** a model turn (never raises): trailing special tokens (``<|endoftext|>``, ``</s>``, any
``<...>`` without spaces) and one trailing "." are dropped, then all whitespace; what is left must
be an integer, ``[+-]?[0-9]{1,18}`` ("6 8", " 68 ", "- 1 9", "+7 ."). Anything else (an empty turn,
words, a second number, text after the number, as when the model runs on to the token cap
instead of stopping) is not an answer: reward 0, finish ``no_action``.

**Reward**: 1.0 for the exact value. A well-formed but wrong integer earns partial credit
(both default to modest values; set both to 0 for a pure 0/1 reward):

    format_reward + digit_reward * (characters equal, right-aligned) / (longer length)

comparing the canonical strings (sign included): "6 9" for 68 scores format + digit / 2, "-68"
for 68 scores format + digit / 3. A wrong answer always scores below 1 (``validate`` keeps
``format_reward + digit_reward <= 1``). The shaping makes GRPO groups of a weak model unequal
(a well-formed answer beats garbage, one with the right digits beats one without), so its updates
have a signal before the first exact answer. Measured on ``configs/arith.toml`` (seed 0) its
effect on held-out accuracy is small once SFT has taught the format: 30% -> 64% with the
defaults, 30% -> 62% without (sampled train accuracy, first 10 RL steps -> last 10: 23% -> 40%
in both). Kept on by default: on an earlier variant of the recipe with a weaker start (31%
before RL) it gave 57% after RL against 51% without.

``info`` (the same keys every step): ``finish`` ("answer" when the turn parsed, "no_action" when
not, or what ``end`` was given), ``correct`` (0/1), ``answer`` (the parsed integer or None).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidpt.env.base import EnvState, Episode, StepResult, run_episode
from sidpt.errors import ConfigError

OPS = ("+", "-", "*")
COMMUTATIVE = ("+", "*")
MAX_DIGITS = 18  # longer integers are not answers (they stay int64 wherever the controller puts them)

_TRAILING_SPECIAL = re.compile(r"(?:\s*<[^<>\s]{1,40}>)+\s*$")
_INTEGER = re.compile(rf"[+-]?[0-9]{{1,{MAX_DIGITS}}}")


@dataclass
class Config:
    """``[env]`` of ``name = "arith"``."""

    max_operand: int = 99
    """Operands are drawn from 0..max_operand (both ends included)."""
    ops: list[str] = field(default_factory=lambda: ["+", "-"])
    """Operations of the problems, each drawn equally often: any of "+", "-", "*"."""
    n_train: int = 2000
    """Train problems (the prompts RL samples from)."""
    n_heldout: int = 200
    """Held-out problems (greedy evaluation before and after RL); disjoint from train and SFT."""
    n_sft: int = 500
    """SFT warm-start problems, disjoint from train and held-out (reserved even when sft.steps = 0,
    so the train problems do not depend on it)."""
    seed: int = 0
    """Seed of the problems (independent of run.seed)."""
    spaced_digits: bool = True
    """Write numbers digit by digit ("6 8"), so a word-level tokenizer spells every number with
    10 digit tokens (see the module docstring); false: "68", for a pretrained model's tokenizer
    (with a random-init model, every number is then a word: ``model.vocab_size`` must hold them
    all, or the ones past the cap read as <unk>)."""
    format_reward: float = 0.1
    """Reward of a well-formed integer answer that is wrong (an exact answer scores 1)."""
    digit_reward: float = 0.2
    """Extra reward of a wrong integer answer, times the share of its characters (sign included)
    that equal the gold answer's, right-aligned: "6 9" for 68 adds half of it."""
    tokenizer_dir: str = "runs/arith-tokenizer"
    """Where the controller caches a random-init model's task tokenizer, in a sub-directory named
    by a digest of ``tokenizer_texts``: a word-level tokenizer numbers its words by frequency in
    those texts, so a tokenizer cached by another problem set (same words, other counts) would
    give other ids, another initial model and another run."""

    def validate(self) -> None:
        if self.max_operand < 0:
            raise ConfigError(f"env.max_operand={self.max_operand}: must be >= 0")
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops or len(set(self.ops)) < len(self.ops):
            raise ConfigError(f"env.ops={list(self.ops)}: expected distinct operations from {list(OPS)}"
                              + (f"; unknown: {bad}" if bad else ""))
        for key, lo in (("n_train", 1), ("n_heldout", 1), ("n_sft", 0)):
            if getattr(self, key) < lo:
                raise ConfigError(f"env.{key}={getattr(self, key)}: must be >= {lo}")
        need, have = self.n_train + self.n_heldout + self.n_sft, n_distinct(self.max_operand, self.ops)
        if need > have:
            raise ConfigError(f"env.n_train={self.n_train}: n_train + n_heldout + n_sft = {need} distinct problems, "
                              f"but max_operand={self.max_operand} with ops={list(self.ops)} has only {have}")
        for key in ("format_reward", "digit_reward"):
            if getattr(self, key) < 0:
                raise ConfigError(f"env.{key}={getattr(self, key)}: must be >= 0")
        if self.format_reward + self.digit_reward > 1:
            raise ConfigError(f"env.format_reward={self.format_reward}: format_reward + digit_reward = "
                              f"{self.format_reward + self.digit_reward} must be <= 1 (a wrong answer must "
                              f"score below an exact one)")


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    id: str  # "23+45"
    a: int
    op: str
    b: int
    answer: int
    where: str = ""  # generated, not read from a file


def compute(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def n_distinct(max_operand: int, ops) -> int:
    """Distinct problems (b + a counted as a + b) with operands in 0..max_operand."""
    n = max_operand + 1
    return sum(n * (n + 1) // 2 if op in COMMUTATIVE else n * n for op in ops)


def _key(a: int, op: str, b: int) -> tuple[int, str, int]:
    return (min(a, b), op, max(a, b)) if op in COMMUTATIVE else (a, op, b)


def make_problems(cfg: Config) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, heldout, sft), deterministic for ``cfg``; see the module docstring."""
    rng = random.Random(cfg.seed)
    n, ops = cfg.max_operand + 1, list(cfg.ops)
    seen: set[tuple[int, str, int]] = set()
    out: list[Problem] = []
    while len(out) < cfg.n_heldout + cfg.n_sft + cfg.n_train:  # validate() checked that enough exist
        op, a, b = rng.choice(ops), rng.randrange(n), rng.randrange(n)
        key = _key(a, op, b)
        if key not in seen:
            seen.add(key)
            out.append(Problem(f"{a}{op}{b}", a, op, b, compute(a, op, b)))
    h, s = cfg.n_heldout, cfg.n_heldout + cfg.n_sft
    return out[s:], out[:h], out[h:s]


# ---------------------------------------------------------------------------------------------
# Text


def spell(n: int, spaced: bool = True) -> str:
    """A number as the model reads and writes it: "- 1 9" (spaced) or "-19"."""
    if not spaced:
        return str(n)
    return ("- " if n < 0 else "") + " ".join(str(abs(n)))


def format_prompt(p: Problem, spaced: bool = True) -> str:
    return f"Compute {spell(p.a, spaced)} {p.op} {spell(p.b, spaced)} . Answer:"


def answer_text(n: int, spaced: bool = True) -> str:
    """The ideal model turn (leading space: a subword tokenizer then reads " 68" as after "Answer:")."""
    return " " + spell(n, spaced)


def parse_answer(text: Any) -> int | None:
    """The integer a model turn states, or None (rules in the module docstring); never raises."""
    if not isinstance(text, str):
        text = str(text)
    t = _TRAILING_SPECIAL.sub("", text).strip()
    if t.endswith("."):
        t = t[:-1]
    t = "".join(t.split())
    return int(t) if _INTEGER.fullmatch(t) else None


def score(pred: int | None, gold: int, format_reward: float, digit_reward: float) -> float:
    """The episode reward of a parsed answer (see the module docstring)."""
    if pred is None:
        return 0.0
    if pred == gold:
        return 1.0
    p, g = str(pred), str(gold)
    same = sum(x == y for x, y in zip(reversed(p), reversed(g)))
    return format_reward + digit_reward * same / max(len(p), len(g))


# ---------------------------------------------------------------------------------------------
# The environment and the task


class ArithEnv:
    """Single-turn: the model's turn (ended by EOS or the token cap) is the answer; implements
    ``sidpt.env.base.Env``."""

    stop_strings: tuple[str, ...] = ()

    def __init__(self, format_reward: float = 0.1, digit_reward: float = 0.2):
        self.format_reward, self.digit_reward = format_reward, digit_reward

    def reset(self, sample: Problem) -> EnvState:
        return EnvState(sample, info={"finish": None, "correct": 0, "answer": None})

    def step(self, state: EnvState, model_text: str) -> StepResult:
        if state.done:
            raise ValueError("step() on a finished episode")
        pred = parse_answer(model_text)
        gold = state.sample.answer
        state.done = True
        state.info.update(finish="answer" if pred is not None else "no_action", correct=int(pred == gold),
                          answer=pred)
        return StepResult(None, True, score(pred, gold, self.format_reward, self.digit_reward), dict(state.info))

    def end(self, state: EnvState, finish: str) -> StepResult:
        if state.done:
            raise ValueError("end() on a finished episode")
        state.done = True
        state.info.update(finish=finish, correct=0, answer=None)
        return StepResult(None, True, 0.0, dict(state.info))


def ideal_policy(p: Problem, spaced: bool = True):
    """The scripted SFT policy: state the exact answer."""
    return lambda turns: answer_text(p.answer, spaced)


class ArithTask:
    """The arithmetic task behind ``sidpt.env.base.Task``."""

    eval_columns = (("accuracy", "accuracy %"), ("answered", "answered %"), ("response_tokens", "response tokens"))

    def __init__(self, cfg: Config):
        cfg.validate()
        self.cfg = cfg
        self.train, self.heldout, self.sft = make_problems(cfg)
        self.env = ArithEnv(cfg.format_reward, cfg.digit_reward)
        texts, special = self.tokenizer_texts()
        digest = hashlib.sha1("\n".join([*texts, "", *special]).encode()).hexdigest()[:12]
        self.tokenizer_dir = Path(cfg.tokenizer_dir) / f"texts-{digest}"

    def prompt(self, sample: Problem) -> str:
        return format_prompt(sample, self.cfg.spaced_digits)

    def sft_episodes(self, n: int, seed: int) -> list[Episode]:
        """Ideal answers to up to ``n`` of the SFT problems (a seeded choice), run through the env."""
        problems = list(self.sft)
        random.Random(seed).shuffle(problems)
        eps = [run_episode(self.env, p, ideal_policy(p, self.cfg.spaced_digits)) for p in problems[:n]]
        return [e for e in eps if e.reward == 1.0]

    def tokenizer_texts(self) -> tuple[list[str], list[str]]:
        sp = self.cfg.spaced_digits
        texts = []
        for p in (*self.train, *self.heldout, *self.sft):
            texts += [format_prompt(p, sp), answer_text(p.answer, sp)]
        texts.append(" ".join(["-", *"0123456789", *OPS]))  # every symbol, whatever was drawn
        return texts, []

    def metrics(self, episodes: list) -> dict[str, tuple[float, float]]:
        n = float(len(episodes))
        info = [e.info for e in episodes]
        return {
            "accuracy": (100.0 * sum(i.get("correct", 0) for i in info), n),
            "answered": (100.0 * sum(i.get("finish") == "answer" for i in info), n),
            "response_tokens": (float(sum(sum(e.out.generated) for e in episodes)), n),
        }

    def example(self, episode: Any, response: str) -> dict[str, Any]:
        p, info = episode.sample, episode.info
        return {"id": p.id, "prompt": self.prompt(p), "gold": p.answer, "answer": info.get("answer"),
                "correct": info.get("correct", 0), "reward": episode.reward, "finish": info.get("finish"),
                "response": response}


def make_task(cfg: Config, is_main: bool, need_sft: bool) -> ArithTask:
    """No files are written (the problems come from the seed), so no barrier is needed."""
    return ArithTask(cfg)


__all__ = ["ArithEnv", "ArithTask", "Config", "Problem", "make_problems", "make_task", "parse_answer", "score"]
