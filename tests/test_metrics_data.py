"""Small pieces of the spine: the PNG writer, per-step prompt choice, SFT question spread."""

import json
import os
import struct
import zlib
from pathlib import Path

import pytest

from sidpt.data import episode_seed, step_indices
from sidpt.env.search.data import spread_questions
from sidpt.env.search.env import Question
from sidpt.metrics import write_line_png


def test_png_is_valid_and_draws_the_series(tmp_path):
    path = tmp_path / "c.png"
    write_line_png(path, {"reward": [(0, 0.1), (1, 0.5), (2, 0.9)]}, width=200, height=120)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (200, 120)
    idat = data[data.index(b"IDAT") + 4:]
    raw = zlib.decompress(idat[: struct.unpack(">I", data[data.index(b"IDAT") - 4: data.index(b"IDAT")])[0]])
    assert len(raw) == h * (1 + 3 * w)
    blue = bytes((31, 119, 180))
    assert raw.count(blue) >= 140  # the line spans the 140-pixel plot area in the first series colour


def test_step_choice_is_deterministic_and_distinct():
    a = step_indices(100, 16, seed=3, step=7)
    assert a == step_indices(100, 16, seed=3, step=7)
    assert len(set(a)) == 16 and a != step_indices(100, 16, seed=3, step=8)
    assert episode_seed(0, 1, 2, 3) != episode_seed(0, 1, 3, 2)


def test_spread_questions_covers_entities_first():
    qs = [Question(f"{e}-{k}", "q", ["a"], {"entity": e, "attribute": k}) for e in "abcdefghij" for k in range(3)]
    got = spread_questions(qs, 12, seed=0)
    assert len(got) == 12 and len({q.meta["entity"] for q in got[:10]}) == 10
    assert {q.meta["attribute"] for q in got[:10]} == {0, 1, 2}  # not only each entity's first question
    assert spread_questions(qs, 12, seed=0) == got


def test_stale_task_dir_is_regenerated_with_its_tokenizer(tmp_path):
    """A task directory generated with other arguments is rebuilt, not silently reused (and the
    tokenizer trained on the old task goes with it); the same arguments reuse it untouched."""
    import json

    from sidpt.env.search.data import prepare_task, task_tokenizer

    task = prepare_task(tmp_path, n_entities=30, seed=0, is_main=True, sft_frac=0.2)
    task_tokenizer(task, 300, is_main=True, kind="word")
    vocab = json.loads((tmp_path / "tokenizer-word-300" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "Question" in vocab and not [w for w in vocab if w.startswith("e000")]  # text, not row ids
    heldout = task["heldout"].read_text()
    mtime = task["corpus"].stat().st_mtime_ns
    prepare_task(tmp_path, n_entities=30, seed=0, is_main=True, sft_frac=0.2)
    assert task["corpus"].stat().st_mtime_ns == mtime  # same arguments: reused
    assert (tmp_path / "tokenizer-word-300").exists()
    prepare_task(tmp_path, n_entities=30, seed=0, is_main=True, sft_frac=0.5)
    meta = json.loads((tmp_path / "task.json").read_text())
    assert meta["sft_frac"] == 0.5 and meta["n_sft_entities"] == 15
    assert task["heldout"].read_text() == heldout  # the held-out split does not depend on sft_frac
    assert len(task["sft"].read_text().splitlines()) == 15 * 6
    assert not (tmp_path / "tokenizer-word-300").exists()


def test_a_second_run_keeps_the_first_runs_metrics_apart(tmp_path):
    import json

    from sidpt.metrics import MetricsLog

    for run in range(3):
        log = MetricsLog(tmp_path / "metrics.jsonl")
        log.log(0, {"run": run})
        log.close()
    read = lambda p: [json.loads(line)["run"] for line in p.read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "metrics.jsonl") == [2.0]
    assert read(tmp_path / "metrics.1.jsonl") == [0.0] and read(tmp_path / "metrics.2.jsonl") == [1.0]


# -- issue 14, items 1 and 2: a user's task files are never written; no half-written task -------

def test_a_users_own_task_is_never_written(tmp_path):
    from sidpt.env.search.data import prepare_task
    from sidpt.errors import ConfigError

    d = tmp_path / "mine"
    d.mkdir()
    files = {"corpus.jsonl": '{"id": "1", "title": "A", "text": "A lives in B."}\n'
                             '{"id": "2", "title": "C", "text": "C lives in D."}\n',
             "train.jsonl": '{"question": "Where does A live?", "answers": ["B"]}\n',
             "heldout.jsonl": '{"question": "Where does C live?", "answers": ["D"]}\n'}
    for name, text in files.items():
        (d / name).write_text(text)
    with pytest.raises(ConfigError, match=r"no task.json .* lacks sft.jsonl \(needed because sft.steps > 0\)"):
        prepare_task(d, n_entities=30, seed=0, is_main=True)
    paths = prepare_task(d, n_entities=30, seed=0, is_main=True, need_sft=False)  # --sft.steps=0
    assert paths["train"] == d / "train.jsonl"
    assert sorted(p.name for p in d.iterdir()) == sorted(files)
    assert all((d / name).read_text() == text for name, text in files.items())


def test_a_task_killed_while_generating_leaves_nothing_half_written(tmp_path, monkeypatch):
    import sidpt.env.search.task as task_mod
    from sidpt.env.search.data import prepare_task

    real = task_mod.make_search_task

    def killed(out_dir, *a, **k):  # writes the corpus, then the run is interrupted
        (Path(out_dir) / "corpus.jsonl").write_text('{"id": "1", "text": "x"}\n')
        raise KeyboardInterrupt

    d = tmp_path / "task"
    monkeypatch.setattr(task_mod, "make_search_task", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_task(d, n_entities=30, seed=0, is_main=True)
    assert not d.exists()  # (the old code left corpus.jsonl in it, then took it for the user's own task)
    monkeypatch.setattr(task_mod, "make_search_task", real)
    paths = prepare_task(d, n_entities=30, seed=1, is_main=True)
    meta = json.loads((d / "task.json").read_text())
    assert meta["seed"] == 1 and all(p.exists() for p in paths.values())
    assert not list(tmp_path.glob(".task.tmp-*"))  # the interrupted run's temporary directory is gone
    assert (d.stat().st_mode & 0o777) == 0o777 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_caches_and_checkpoints_are_team_readable(tmp_path):
    """mkstemp/mkdtemp make 0600 files and 0700 directories: a BM25 cache and a checkpoint were
    unreadable by the rest of a team (issue 14, item 8)."""
    from sidpt.env.search.bm25 import cache_path, load_bm25
    from sidpt.model import ModelArgs, build_model, save_checkpoint

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "title": "A", "text": "A lives in B."}\n{"id": "2", "title": "C", "text": "x"}\n')
    load_bm25(corpus)
    want_file, want_dir = 0o666 & ~_umask(), 0o777 & ~_umask()
    assert cache_path(corpus).stat().st_mode & 0o777 == want_file
    save_checkpoint(tmp_path / "ckpt", build_model(ModelArgs(vocab_size=32, dim=16, n_layers=1, n_heads=2,
                                                             n_kv_heads=1, intermediate_size=32)))
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == want_dir


def test_lr_schedule_closed_forms():
    """Warmup then constant or cosine (issue 14, item 8: there was no schedule)."""
    import math

    from sidpt.trainer import lr_at

    assert [lr_at(i, 5, 1.0) for i in range(5)] == [1.0] * 5  # the default: today's constant rate
    warm = [lr_at(i, 10, 2.0, "constant", warmup=3) for i in range(10)]
    assert warm[:4] == [0.5, 1.0, 1.5, 2.0] and set(warm[3:]) == {2.0}
    cos = [lr_at(i, 12, 1.0, "cosine", warmup=2, min_frac=0.1) for i in range(12)]
    assert cos[:2] == [1 / 3, 2 / 3] and cos[2] == 1.0 and math.isclose(cos[-1], 0.1, abs_tol=1e-12)
    for i in range(2, 12):  # the closed form, step by step
        t = (i - 2) / 9
        assert math.isclose(cos[i], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)), rel_tol=1e-12)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))  # decreasing after the warmup


def test_reward_plot_has_axes_labels_legend_and_room_below_zero(tmp_path):
    """The old PNG had no title, ticks, labels or scale, and a reward of 0 lay on the x-axis."""
    import matplotlib.pyplot as plt

    from sidpt.metrics import plot_reward_curve, reward_figure

    curve = [(i, 0.0 if i < 5 else 0.02 * i) for i in range(40)]
    fig = reward_figure(curve, {"before": (0, 9.0), "after": (40, 23.5)})
    ax, ax2 = fig.axes
    assert ax.get_xlabel() == "RL step" and ax.get_ylabel() == "reward (0 to 1)" and ax.get_title()
    assert ax2.get_ylabel() == "held-out exact match (%)"
    assert ax.get_ylim()[0] < 0 < ax.get_ylim()[1]  # 0 is above the axis line
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["mean reward of the step's episodes", "moving average (2 steps)", "held-out exact match (greedy)"]
    assert len(ax.get_xticklabels()) > 2 and len(ax.get_yticklabels()) > 2
    plt.close(fig)
    assert plot_reward_curve(tmp_path / "c.png", curve) == "matplotlib"
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))
