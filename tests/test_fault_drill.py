"""tools/fault_drill.py on its quick faults (slow: about a minute): each is detected and survived,
and nothing is lost; the table and summary.json are written. The whole drill is the closing
note's table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_faults_are_survived_with_nothing_lost(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/fault_drill.py"), "--out", str(tmp_path),
                           "--only", "nonfinite,config,crafted,malformed,reward"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["fault"].split()[0] for r in rows] == ["non-finite", "resume", "checkpoint", "malformed", "reward"]
    assert all(r["survived"] and r["data_lost"].startswith("none") for r in rows)
    assert "every fault survived, nothing lost" in proc.stdout
