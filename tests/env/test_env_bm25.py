"""BM25 against a hand-computed float64 formula, and the on-disk index cache (written, reused, rebuilt)."""

import json
import math

import pytest

import sidpt.env.search.bm25 as bm25_mod
from sidpt.env.search.bm25 import BM25, CorpusError, Doc, cache_path, load_bm25, load_corpus, tokenize

# Indexed text is title + text; token counts written out by hand below.
TOY = [
    Doc("d0", "Apple", "apple pie recipe"),  # apple:2 pie:1 recipe:1            |D| = 4
    Doc("d1", "Banana", "Banana bread, and apple!"),  # banana:2 bread:1 and:1 apple:1  |D| = 5
    Doc("d2", "Cherry", "cherry tart"),  # cherry:2 tart:1                   |D| = 3
    Doc("d3", "", "the pie shop sells pie"),  # the:1 pie:2 shop:1 sells:1      |D| = 5
]


def bm25_by_hand(terms: list[tuple[int, int]], dl: int, n=4, avgdl=17 / 4, k1=1.2, b=0.75) -> float:
    """sum over query terms of idf * tf (k1 + 1) / (tf + k1 (1 - b + b |D| / avgdl)),
    idf = ln(1 + (N - df + 0.5) / (df + 0.5)); ``terms`` = [(tf in D, df), ...]."""
    total = 0.0
    for tf, df in terms:
        idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
    return total


def test_tokenize():
    want = ["banana", "bread", "and", "apple", "x", "y", "1873"]
    assert tokenize("Banana bread, and APPLE! x_y 1873") == want


def test_scores_equal_hand_computed_bm25():
    bm = BM25.build(TOY)
    assert bm.avgdl == 17 / 4
    s = bm.scores("apple pie")
    # apple: df 2 (d0, d1); pie: df 2 (d0, d3)
    want = {
        0: bm25_by_hand([(2, 2), (1, 2)], dl=4),
        1: bm25_by_hand([(1, 2)], dl=5),
        3: bm25_by_hand([(2, 2)], dl=5),
    }
    assert set(s) == set(want)
    for d, w in want.items():
        assert math.isclose(s[d], w, rel_tol=1e-12), (d, s[d], w)
    # A repeated query token counts twice; an unknown token adds nothing.
    s2 = bm.scores("cherry cherry zzz")
    assert math.isclose(s2[2], 2 * bm25_by_hand([(2, 1)], dl=3), rel_tol=1e-12)
    assert list(s2) == [2]
    # Numeric anchor of the formula itself: d2 for "tart" (tf 1, df 1, |D| 3).
    idf = math.log(1 + 3.5 / 1.5)
    assert math.isclose(bm.scores("tart")[2], idf * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 3 / 4.25)), rel_tol=1e-12)


def test_search_ranks_and_ties():
    bm = BM25.build(TOY)
    hits = bm.search("apple pie", k=10)
    assert [d.id for d, _ in hits] == ["d0", "d3", "d1"]  # only positive scores, best first
    assert [d.id for d, _ in bm.search("pie", k=1)] == ["d3"]  # tf 2 beats tf 1 at similar length
    twins = BM25.build([Doc("a", "", "x y"), Doc("b", "", "x y")])
    assert [d.id for d, _ in twins.search("x", k=2)] == ["a", "b"]  # equal scores: earlier document first
    assert bm.search("nothing here", k=3) == []


def _write_corpus(path, docs):
    path.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))


def test_cache_written_reused_and_rebuilt(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus, TOY)
    calls = []
    real = bm25_mod.index_documents
    monkeypatch.setattr(bm25_mod, "index_documents", lambda docs: calls.append(len(docs)) or real(docs))

    first = load_bm25(corpus)
    cache = cache_path(corpus)
    assert cache == tmp_path / "corpus.jsonl.bm25.json" and cache.exists()
    assert not first.from_cache and calls == [4]
    mtime = cache.stat().st_mtime_ns

    second = load_bm25(corpus, k1=0.9, b=0.4)  # k1, b act at query time: same index
    assert second.from_cache and calls == [4]
    assert cache.stat().st_mtime_ns == mtime
    assert second.doc_len == first.doc_len and second.postings == first.postings
    assert math.isclose(load_bm25(corpus).scores("apple pie")[0], first.scores("apple pie")[0], rel_tol=0)

    _write_corpus(corpus, TOY + [Doc("d4", "Durian", "durian apple")])  # the corpus changes
    third = load_bm25(corpus)
    assert not third.from_cache and calls == [4, 5]
    assert json.loads(cache.read_text())["n_docs"] == 5
    assert [d.id for d, _ in third.search("durian", 1)] == ["d4"]
    assert load_bm25(corpus).from_cache and calls == [4, 5]

    cache.write_text("{not json")  # a corrupt cache is rebuilt, not trusted
    assert not load_bm25(corpus).from_cache and calls == [4, 5, 5]
    # No temp file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "corpus.jsonl.bm25.json"]


def test_cache_off_and_unwritable(tmp_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    _write_corpus(corpus, TOY)
    assert not load_bm25(corpus, cache=False).from_cache and not cache_path(corpus).exists()

    def refuse(path, text):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(bm25_mod, "atomic_write", refuse)
    bm = load_bm25(corpus)  # cannot write the cache: the index still works
    assert not bm.from_cache and [d.id for d, _ in bm.search("tart", 1)] == ["d2"]
    assert not cache_path(corpus).exists()


def test_search_r1_corpus_layout_and_errors(tmp_path):
    p = tmp_path / "wiki.jsonl"
    p.write_text(json.dumps({"id": "0", "contents": '"Aaron"\nAaron is a prophet.'}) + "\n\n"
                 + json.dumps({"id": 1, "title": "T", "text": "body"}) + "\n")
    assert load_corpus(p) == [Doc("0", '"Aaron"', "Aaron is a prophet."), Doc("1", "T", "body")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0", "title": "a", "text": "b"}\n{"id": "1", "title": "x"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: expected string 'title' and 'text'"):
        load_corpus(bad)
    bad.write_text('{"id": "0", "text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid JSON"):
        load_corpus(bad)
    bad.write_text("\n")
    with pytest.raises(CorpusError, match="no documents"):
        load_corpus(bad)
