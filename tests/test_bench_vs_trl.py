"""tools/bench_vs_trl.py end to end on its sidpt side (TRL is not a test dependency): the shared
checkpoint loads identically in sidpt and transformers, sidpt's real program runs the planned
prompts, and the realised share of equal-reward groups is the planned one."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_vs_trl_sidpt_side(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_vs_trl.py"), "--size", "1M", "--steps", "2",
                           "--warmup", "1", "--new-tokens", "8", "--flat-shares", "0.5", "--sidpt-only",
                           "--threads", "1", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "both tokenizers give the same ids and text on 64 prompts" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = next(r for r in rows if r["kind"] == "summary" and r["system"] == "sidpt")
    assert summary["same_prompts"] and summary["measured_steps"] == 2
    assert summary["flat_share"] == 0.5  # 2 of the 4 measured groups, exactly
    steps = [r for r in rows if r["kind"] == "step"]
    assert all(0 < r["tokens"] <= 16 * 8 for r in steps)  # 16 samples of at most 8 tokens
    assert all(0 < r["forward_tokens"] < r["seq_tokens"] for r in steps)  # packing: each prompt once
