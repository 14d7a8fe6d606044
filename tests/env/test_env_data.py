"""Question files in sidpt, FlashRAG and Search-R1 layouts; a bad row names its file and line."""

import json

import pytest

from sidpt.env.search import DataError, Question, as_question, load_questions

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
