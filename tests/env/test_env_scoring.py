"""Exact match and token F1 with SQuAD normalisation, on hand-computed fixtures."""

import pytest

from sidpt.env.search.scoring import exact_match, normalize_answer, token_f1


@pytest.mark.parametrize("raw,norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   APPLE. ", "apple"),
    ("Eiffel-Tower!", "eiffeltower"),  # SQuAD deletes punctuation, it does not split on it
    ("theatre of a the", "theatre of"),  # whole-word articles only
    ("Zorvath's  (house)", "zorvaths house"),
    ("", ""),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match():
    assert exact_match("an Apple.", ["apple"]) == 1.0
    assert exact_match("apples", ["apple"]) == 0.0
    assert exact_match("Paris", ["London", "the paris"]) == 1.0  # any gold answer
    assert exact_match("1873", ["1873"]) == 1.0
    assert exact_match("", ["the"]) == 1.0  # both normalise to ""
    assert exact_match("x", []) == 0.0


def test_token_f1():
    # pred {big, red, apple}, gold {red, apple, pie}: 2 shared, P = R = 2/3
    assert token_f1("The big red apple", ["red apple pie"]) == pytest.approx(2 / 3, abs=1e-15)
    # bags: x x y vs x y y share min counts x:1 y:1 -> 2 of 3 each side
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3, abs=1e-15)
    # pred {vantrel, guild}: vs "vantrel works" P = R = 1/2 -> 1/2; vs "vantrel" P = 1/2, R = 1 -> 2/3;
    # the best is 2/3
    assert token_f1("Vantrel Guild", ["Vantrel Works", "Vantrel"]) == pytest.approx(2 / 3, abs=1e-15)
    # pred 1 token, gold 4 tokens, 1 shared: P = 1, R = 1/4 -> 2 * 1/4 / (5/4) = 2/5
    assert token_f1("Quorbin", ["city of north quorbin"]) == pytest.approx(2 / 5, abs=1e-15)
    assert token_f1("red", ["blue"]) == 0.0
    assert token_f1("", ["the"]) == 1.0 and token_f1("", ["x"]) == 0.0 and token_f1("an", ["x"]) == 0.0
    assert token_f1("Apple!", ["apple"]) == 1.0
