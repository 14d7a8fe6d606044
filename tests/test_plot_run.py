"""tools/plot_run.py on a run directory written the way a run writes it (metrics.jsonl rows with
the utilisation keys, results.json): every figure drawn as a PNG, the missing ones named."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from plot_run import plot_run  # noqa: E402

from sidpt.utilisation import PHASES, StepWork, rlu_row  # noqa: E402


def fake_run(run_dir: Path, asynchronous: bool) -> None:
    rows, total = [], StepWork()
    for step in range(6):
        w = StepWork()
        for i, p in enumerate(PHASES):
            w.add(p, 0.1 * (i + 1) * (1 + step % 3), 0.01 * (i + 1), 0.005 * (i + 1) if p == "train" else None)
        w.wall, w.weighted_len, w.total_len = sum(w.seconds.values()) * 1.004, 3.0 + step, 10.0
        total = total + w
        row = {"step": step, "reward/mean": 0.1 * step, "mismatch/kl_k3": 1e-4 * (step + 1),
               "mismatch/chi2_token": 2e-4, "mismatch/ess_ratio": 0.99, "mismatch/ess_weight": 0.98,
               **rlu_row(w, 0.98)}
        if asynchronous:
            row.update({"staleness/tokens_0": 50.0 + step, "staleness/tokens_1": 20.0})
        rows.append(row)
    rows.insert(0, {"step": 0, "eval/exact_match": 5.0})
    rows.append({"step": 6, "eval/exact_match": 12.5})
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "results.json").write_text(json.dumps({"utilisation": rlu_row(total, 0.98, between=0.3)}))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_plot_run_draws_every_figure(tmp_path, asynchronous):
    fake_run(tmp_path / "run", asynchronous)
    got = plot_run(tmp_path / "run")
    drawn = {k for k, why in got.items() if why is None}
    assert drawn == {"reward.png", "mismatch.png", "rlu.png", "waterfall.png"} | ({"staleness.png"} if asynchronous else set())
    if not asynchronous:
        assert "synchronous" in got["staleness.png"]
    for name in drawn:
        data = (tmp_path / "run" / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name  # a real chart, not a blank
    assert not list((tmp_path / "run" / "plots").glob("*.tmp.png"))


def test_plot_run_names_a_directory_without_metrics(tmp_path):
    with pytest.raises(SystemExit, match="no metrics"):
        plot_run(tmp_path)
