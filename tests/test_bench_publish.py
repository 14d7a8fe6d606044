"""tools/bench_publish.py --quick runs end to end: colocated and 1 -> 1 gloo publish, weights bitwise equal."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_publish_quick():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_publish.py"), "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "bitwise equal to the sender's: 4 of 4 configurations (all)" in out.stdout, out.stdout[-3000:]
    assert "colocated" in out.stdout and "disaggregated" in out.stdout
