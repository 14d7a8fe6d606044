"""A JSONL document corpus and an Okapi BM25 retriever over it, in plain Python, cached on disk.

Corpus rows are ``{"id", "title", "text"}`` (sidpt) or ``{"id", "contents"}`` (Search-R1 /
FlashRAG, where ``contents`` is ``'"Title"\\ntext'``: the first line is the title). A document is
indexed as its title followed by its text.

Scoring is Okapi BM25 with Lucene's (and so Pyserini's, which Search-R1 uses) always-positive IDF:

    score(D, Q) = sum over query tokens q (repeats count) of
                  idf(q) * tf(q, D) * (k1 + 1) / (tf(q, D) + k1 * (1 - b + b * |D| / avgdl))
    idf(q)      = ln(1 + (N - df(q) + 0.5) / (df(q) + 0.5))

with N documents, df(q) documents containing q, |D| the token count of D and avgdl the mean |D|.
Tokens are maximal runs of Unicode letters and digits of the lowercased text (``tokenize``).

The index (an inverted index: term -> the documents holding it and their term counts, plus every
document's length) is built once and cached next to the corpus as ``<corpus>.bm25.json``. The
cache is keyed by the SHA-256 of the corpus bytes and the index format, so a changed corpus is
re-indexed; k1 and b are applied at query time and are not part of the key. The cache is written
atomically (temp file in the same directory + ``os.replace``), so a crash or a concurrent reader
never sees half a file. Plain dicts and lists: ~10k short documents index in well under a second
and a query touches only the postings of its own terms.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sidpt.files import atomic_write

TOKEN_RE = re.compile(r"[^\W_]+")
CACHE_SUFFIX = ".bm25.json"
INDEX_FORMAT = "sidpt-bm25-v1 tokens=[^\\W_]+ lowercase"  # bump when tokenize() or the layout changes


class CorpusError(ValueError):
    """A corpus row is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str


def tokenize(text: str) -> list[str]:
    """Lowercase, then the maximal runs of letters and digits (punctuation and ``_`` split)."""
    return TOKEN_RE.findall(text.lower())


def _doc_from_row(row: object, where: str) -> Doc:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise CorpusError(f"{where}: missing 'id'")
    if "contents" in row and "text" not in row:  # Search-R1 / FlashRAG layout
        contents = row["contents"]
        if not isinstance(contents, str):
            raise CorpusError(f"{where}: 'contents' must be a string")
        title, _, text = contents.partition("\n")
        return Doc(str(row["id"]), title, text)
    title, text = row.get("title", ""), row.get("text")
    if not isinstance(text, str) or not isinstance(title, str):
        raise CorpusError(f"{where}: expected string 'title' and 'text' (or Search-R1's 'contents')")
    return Doc(str(row["id"]), title, text)


def utf8_text(data: bytes, path: str | os.PathLike, error: type[Exception]) -> str:
    """``data`` decoded as UTF-8; a bad byte raises ``error`` naming the file, line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def jsonl_rows(text: str, path: str | os.PathLike, error: type[Exception], skipped: list[str] | None = None):
    """(``"path:line"``, row) for each non-blank line; a bad line raises ``error`` naming file and
    line, or (``skipped`` given: ``env.bad_rows = "skip"``) is appended there as that message and left out."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if skipped is None:
                raise error(f"{path}:{lineno}: invalid JSON ({e})") from None
            skipped.append(f"{path}:{lineno}: invalid JSON ({e})")
            continue
        yield f"{path}:{lineno}", row


def parse_rows(rows, parse, error: type[Exception], skipped: list[str] | None = None) -> list:
    """``parse(row, where)`` of each (where, row); a row it rejects (``error``) raises, or with
    ``skipped`` is recorded there and left out."""
    out = []
    for where, row in rows:
        try:
            out.append(parse(row, where))
        except error as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    return out


def parse_corpus(data: bytes, path: str | os.PathLike = "<corpus>", skipped: list[str] | None = None) -> list[Doc]:
    rows = jsonl_rows(utf8_text(data, path, CorpusError), path, CorpusError, skipped)
    docs = parse_rows(rows, _doc_from_row, CorpusError, skipped)
    if not docs:
        raise CorpusError(f"{path}: the corpus has no documents")
    return docs


def load_corpus(path: str | os.PathLike) -> list[Doc]:
    return parse_corpus(Path(path).read_bytes(), path)


class BM25:
    """Okapi BM25 over a list of documents (formula in the module docstring)."""

    def __init__(self, docs: list[Doc], doc_len: list[int], postings: dict[str, list[list[int]]],
                 k1: float = 1.2, b: float = 0.75):
        if len(doc_len) != len(docs):
            raise ValueError(f"BM25: {len(docs)} documents but {len(doc_len)} lengths")
        self.docs, self.doc_len, self.postings = docs, doc_len, postings
        self.k1, self.b = k1, b
        self.avgdl = sum(doc_len) / len(doc_len) if doc_len else 0.0
        avgdl = self.avgdl or 1.0  # every document empty: no term matches anyway
        # The length part of each document's denominator, once: k1 * (1 - b + b * |D| / avgdl).
        self.norm = [k1 * (1 - b + b * n / avgdl) for n in doc_len]
        self.from_cache = False  # set by load_bm25 when the index came from the disk cache

    @classmethod
    def build(cls, docs: list[Doc], k1: float = 1.2, b: float = 0.75) -> BM25:
        doc_len, postings = index_documents(docs)
        return cls(docs, doc_len, postings, k1, b)

    def idf(self, term: str) -> float:
        df = len(self.postings[term][0]) if term in self.postings else 0
        n = len(self.docs)
        return math.log(1 + (n - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> dict[int, float]:
        """Document index -> BM25 score, for the documents holding at least one query token."""
        out: dict[int, float] = {}
        k1 = self.k1
        for term in tokenize(query):
            post = self.postings.get(term)
            if post is None:
                continue
            idf = self.idf(term)
            for d, tf in zip(post[0], post[1]):
                out[d] = out.get(d, 0.0) + idf * tf * (k1 + 1) / (tf + self.norm[d])
        return out

    def search(self, query: str, k: int) -> list[tuple[Doc, float]]:
        """The top ``k`` documents with a positive score, best first; ties go to the earlier document."""
        best = heapq.nlargest(k, self.scores(query).items(), key=lambda kv: (kv[1], -kv[0]))
        return [(self.docs[d], s) for d, s in best]


def index_documents(docs: list[Doc]) -> tuple[list[int], dict[str, list[list[int]]]]:
    """(token count per document, term -> [document indices, term counts]) in document order."""
    doc_len: list[int] = []
    postings: dict[str, list[list[int]]] = {}
    for i, doc in enumerate(docs):
        toks = tokenize(doc.title + "\n" + doc.text)
        doc_len.append(len(toks))
        counts: dict[str, int] = {}
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            post = postings.get(t)
            if post is None:
                post = postings[t] = [[], []]
            post[0].append(i)
            post[1].append(c)
    return doc_len, postings


def cache_path(corpus_path: str | os.PathLike) -> Path:
    p = Path(corpus_path)
    return p.with_name(p.name + CACHE_SUFFIX)


def load_bm25(corpus_path: str | os.PathLike, k1: float = 1.2, b: float = 0.75, cache: bool = True,
              skipped: list[str] | None = None) -> BM25:
    """BM25 over the JSONL corpus at ``corpus_path``, its index read from (or written to) the cache
    (``skipped``: malformed rows are left out and recorded there, see ``jsonl_rows``).

    ``.from_cache`` on the result says whether the index was reused. A cache that cannot be
    written (read-only directory) is skipped silently: the index is still built in memory."""
    data = Path(corpus_path).read_bytes()
    docs = parse_corpus(data, corpus_path, skipped)
    key = hashlib.sha256(data).hexdigest()
    cpath = cache_path(corpus_path)
    if cache and cpath.exists():
        try:
            blob = json.loads(cpath.read_text(encoding="utf-8"))
            if blob.get("format") == INDEX_FORMAT and blob.get("corpus_sha256") == key:
                bm = BM25(docs, blob["doc_len"], blob["postings"], k1, b)
                bm.from_cache = True
                return bm
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass  # a corrupt or foreign cache: rebuild and overwrite it
    doc_len, postings = index_documents(docs)
    if cache:
        blob = {"format": INDEX_FORMAT, "corpus_sha256": key, "n_docs": len(docs), "doc_len": doc_len,
                "postings": postings}
        try:
            atomic_write(cpath, json.dumps(blob, separators=(",", ":")))
        except OSError:
            pass
    return BM25(docs, doc_len, postings, k1, b)
