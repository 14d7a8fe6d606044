"""Disaggregated placement on real gloo processes: R rollout ranks generate, T trainer ranks train
(FSDP2), trajectory groups cross the bridge group, weights are broadcast back after every step.

Run in float64 with the golden run's recipe (tests/spine/test_golden.py): per-step SFT and RL
losses and gradient norms equal the colocated single-process run's (golden.json, which
test_golden checks against a live colocated run) within 1e-6, and after every publish each
rollout engine's weights are bitwise equal to the trainer's full weights
(``publish/weights_max_abs`` = 0, measured with ``run.verify_publish``)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.spine.test_golden import GOLDEN, KEYS, OVERRIDES, ROOT, assert_series
from tests.test_utilisation import assert_waterfall


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disaggregated_run(out: Path, rollout: int, trainer: int, *extra: str) -> list[dict]:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(rollout + trainer),
            "--master-port", str(_free_port()), "-m", "sidpt", str(ROOT / "configs/debug.toml"), *OVERRIDES,
            "--model.dtype=float64", f"--run.out_dir={out}", f"--env.dir={out / 'task'}", "--run.name=golden",
            "--run.placement=disaggregated", f"--run.rollout_ranks={rollout}", "--run.verify_publish=true", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "golden" / "metrics.jsonl").read_text().splitlines()]


def golden_series(rows: list[dict]) -> dict[str, list[float]]:
    """The per-step values of KEYS (SFT rows and RL rows that trained) from metrics.jsonl rows."""
    series: dict[str, list[float]] = {}
    for row in rows:
        for axis, keys in KEYS.items():
            if axis in row and (axis == "sft_step" or "loss/total" in row):
                for k in keys:
                    series.setdefault(k, []).append(row[k])
    return series


@pytest.mark.parametrize("rollout, trainer", [
    (1, 1), pytest.param(1, 2, marks=pytest.mark.slow), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_disaggregated_equals_colocated(tmp_path, rollout, trainer):
    rows = disaggregated_run(tmp_path, rollout, trainer, "--run.trace_steps=1:3")
    assert_series(golden_series(rows), json.loads(GOLDEN.read_text())["float64"], 1e-6, f"disaggregated {rollout}+{trainer}")
    rl = [row for row in rows if "loss/total" in row]
    assert [row["publish/weights_max_abs"] for row in rl] == [0.0] * len(rl)  # bitwise, every publish
    assert all(row["policy_version"] == row["step"] + 1 for row in rl)  # 0 after the warm-start, then one per step
    assert all(row["rollout/episodes"] == 32 for row in rl)  # 8 groups x 4, over all rollout ranks
    for row in rl:  # every rank's time, the trainer's waiting for trajectories included (docs/rlu.md)
        assert_waterfall(row)
        assert row["waterfall/idle"] > 0.05 and row["waterfall/transfer"] > 0  # the meshes wait for each other
        assert row["waterfall_trainer/train"] > row["waterfall_rollout/train"] == 0.0  # by role
        assert row["waterfall_rollout/generate"] > 0.3 and row["waterfall_trainer/generate"] == 0.0
    assert_waterfall(json.loads((tmp_path / "golden" / "results.json").read_text())["utilisation"])
    # the timeline: every rank's phases of steps 1 and 2, each inside its own step's span
    events = json.loads((tmp_path / "golden" / "trace.json").read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {k: f"rank {k} ({'rollout' if k < rollout else 'trainer'})" for k in range(rollout + trainer)}
    for pid in names:
        steps = [e for e in events if e["pid"] == pid and e["name"] == "step"]
        assert [e["args"]["step"] for e in steps] == [1, 2]
        spans = [e for e in events if e["pid"] == pid and e["ph"] == "X" and e["name"] != "step"]
        want = {"rollout", "idle", "transfer", "publish"} if pid < rollout else {"idle", "transfer", "trainer", "train"}
        assert want <= {e["name"] for e in spans}, (pid, {e["name"] for e in spans})
        assert all(any(s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1 for s in steps) for e in spans)
