"""Answer scoring: exact match and token F1 with SQuAD normalisation (the metric QA papers report).

``normalize_answer`` is the SQuAD v1.1 evaluation script's, step for step: lowercase, drop
ASCII punctuation, drop the articles a/an/the, collapse whitespace. F1 follows the SQuAD v2.0
script where either side normalises to no tokens (F1 = 1 if both are empty, else 0). Several gold
answers: the best score over them.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _em(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, golds: list[str]) -> float:
    """1.0 if ``pred`` equals any gold answer after normalisation, else 0.0."""
    return max((_em(pred, g) for g in golds), default=0.0)


def token_f1(pred: str, golds: list[str]) -> float:
    """Best token-level F1 (bag of normalised words) of ``pred`` against the gold answers."""
    return max((_f1(pred, g) for g in golds), default=0.0)
