"""Question files in sidpt, FlashRAG and Search-R1 layouts; a bad row names its file and line."""

import json

import pytest

from sidpt.env.search.env import DataError, Question, as_question, load_questions

SEARCH_R1_PROMPT = ("Answer the given question. You must conduct reasoning inside <think> and </think> "
                    "first ... For example, <answer> Beijing </answer>. Question: who wrote hamlet?\n")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_layouts(tmp_path):
    p = _write(tmp_path / "q.jsonl", [
        {"id": "q1", "question": "Who? ", "answers": ["A", "B"], "entity": "E"},  # sidpt
        {"id": "train_0", "question": "who got the first nobel prize in physics?",
         "golden_answers": ["Wilhelm Conrad R\u00f6ntgen"]},  # FlashRAG / Search-R1 raw data
        {"data_source": "nq", "prompt": [{"role": "user", "content": SEARCH_R1_PROMPT}],
         "ability": "fact-reasoning",
         "reward_model": {"style": "rule",
                          "ground_truth": {"target": ["Shakespeare", "William Shakespeare"]}},
         "extra_info": {"split": "train", "index": 7}},  # Search-R1 processed rows
        "",  # blank lines are skipped
        {"question": "What year?", "answers": 1873},  # a scalar answer; no id: the line number
    ])
    qs = load_questions(p)
    assert [(q.id, q.question, q.answers) for q in qs] == [
        ("q1", "Who?", ["A", "B"]),
        ("train_0", "who got the first nobel prize in physics?", ["Wilhelm Conrad R\u00f6ntgen"]),
        ("7", "who wrote hamlet?", ["Shakespeare", "William Shakespeare"]),
        ("5", "What year?", ["1873"]),
    ]
    assert qs[0].meta == {"entity": "E"} and qs[2].meta["data_source"] == "nq"
    q = Question("x", "y", ["z"])
    assert as_question(q) is q
    assert as_question({"question": "q", "reward_model": {"ground_truth": "gt"}}).answers == ["gt"]


@pytest.mark.parametrize("bad,message", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": 1, "answers": ["a"]}', "no question"),
    ('{"question": "  ", "answers": ["a"]}', "no question"),
    ('{"question": "q"}', "non-empty list of answers"),
    ('{"question": "q", "answers": []}', "non-empty list of answers"),
    ('{"question": "q", "golden_answers": [{"text": "a"}]}', "non-empty list of answers"),
    ('{"question": "q", "answers": [true]}', "non-empty list of answers"),
])
def test_bad_row_names_file_and_line(tmp_path, bad, message):
    p = _write(tmp_path / "data.jsonl", [{"question": "ok", "answers": ["a"]}, "", bad])
    with pytest.raises(DataError) as e:
        load_questions(p)
    assert str(e.value).startswith(f"{p}:3: ") and message in str(e.value)


def test_search_r1_parquet_questions(tmp_path):
    """Search-R1's own train/test files are parquet: read with pyarrow, no hand conversion
    (issue 14, item 8); a task directory may hold them in place of train/heldout.jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sidpt.env.search.data import prepare_task
    from sidpt.env.search.env import load_questions

    rows = [{"data_source": "nq", "prompt": [{"role": "user", "content": "Answer it. Question: who wrote Dune?"}],
             "reward_model": {"ground_truth": {"target": ["Frank Herbert"]}, "style": "rule"},
             "extra_info": {"index": 7, "split": "train"}},
            {"data_source": "nq", "prompt": [{"role": "user", "content": "Question: capital of France?"}],
             "reward_model": {"ground_truth": {"target": ["Paris", "paris"]}, "style": "rule"},
             "extra_info": {"index": 8, "split": "train"}}]
    d = tmp_path / "sr1"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), d / "heldout.parquet")
    (d / "corpus.jsonl").write_text('{"id": "1", "contents": "\\"Dune\\"\\nDune is a novel by Frank Herbert."}\n')
    qs = load_questions(d / "train.parquet")
    assert [(q.id, q.question, q.answers) for q in qs] == [
        ("7", "who wrote Dune?", ["Frank Herbert"]), ("8", "capital of France?", ["Paris", "paris"])]
    assert qs[1].where.endswith("train.parquet:row 2")
    paths = prepare_task(d, n_entities=30, seed=0, is_main=True, need_sft=False)
    assert paths["train"].name == "train.parquet" and paths["heldout"].name == "heldout.parquet"
    assert sorted(p.name for p in d.iterdir()) == ["corpus.jsonl", "heldout.parquet", "train.parquet"]
    (d / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        load_questions(d / "bad.parquet")


def test_bad_rows_skip_counts_and_names_them(tmp_path):
    """env.bad_rows = "skip": malformed question and corpus rows are left out, each recorded with
    file and line; the task reports them (the controller lists them in skipped_rows.txt)."""
    from sidpt.env.search import Config, make_task
    from sidpt.env.search.task import make_search_task

    gen = tmp_path / "gen"
    make_search_task(gen, 12, seed=0)
    own = tmp_path / "own"  # the user's own task: read as it is
    own.mkdir()
    for name in ("corpus", "train", "heldout", "sft"):
        lines = (gen / f"{name}.jsonl").read_text().splitlines()
        bad = "{not json" if name != "heldout" else '{"question": "q"}'
        (own / f"{name}.jsonl").write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"own/train.jsonl:3: invalid JSON"):
        load_questions(own / "train.jsonl")
    skipped = []
    qs = load_questions(own / "train.jsonl", skipped)
    assert [q.id for q in qs] == [q.id for q in load_questions(gen / "train.jsonl")]
    assert len(skipped) == 1 and skipped[0].startswith(f"{own}/train.jsonl:3: invalid JSON")
    task = make_task(Config(dir=str(own), bad_rows="skip"), is_main=True, need_sft=True)
    where = sorted(s.split(": ")[0].rsplit("/", 1)[1] for s in task.skipped_rows)
    assert where == ["corpus.jsonl:3", "heldout.jsonl:3", "sft.jsonl:3", "train.jsonl:3"]
    assert len(task.train) == len(load_questions(gen / "train.jsonl"))
    assert len(task.env.retriever.docs) == len((gen / "corpus.jsonl").read_text().splitlines())
    assert task.tokenizer_texts()[0]  # the tokenizer's texts read past the bad rows too
    with pytest.raises(Exception, match=r"corpus.jsonl:3: invalid JSON"):
        make_task(Config(dir=str(own)), is_main=True, need_sft=True)
