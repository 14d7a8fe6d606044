"""The repository's promises to a new user: the README's test command is what CI runs, and the entry works."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks[:1] for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    cmds = readme_commands()
    test_cmd = [c for c in cmds if "pytest" in c]
    assert test_cmd, "the README's first code block must hold the test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd[-1].split("&&")[-1].strip() in [line.strip() for line in ci]


def test_entry_validates_config_and_writes_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), f"--run.out_dir={tmp_path}",
         "--run.name=t", f"--task.dir={tmp_path / 'task'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "t" / "config.toml").read_text().count("[run]") == 1
    assert "held-out search questions" in out.stdout and "exact match" in out.stdout
    rows = [json.loads(r) for r in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if "reward/mean" in r]
    assert len(rl) == 4  # one row per RL step of debug.toml
    # the debug recipe trains: some RL step reaches the policy-gradient update (issue 14, item 7)
    assert any(r["train/seqs"] > 0 and r["train/grad_norm"] > 0 for r in rl), [
        (r["reward/mean"], r["train/seqs"], r["train/grad_norm"]) for r in rl]
    assert (tmp_path / "t" / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(  # a rerun under the same name is refused before anything is written
        [sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), f"--run.out_dir={tmp_path}",
         "--run.name=t", f"--task.dir={tmp_path / 'task'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr[-3000:]
    assert "holds an earlier run (config.toml, metrics.jsonl)" in again.stderr and "--run.overwrite=true" in again.stderr
    assert not list((tmp_path / "t").glob("metrics.*.jsonl"))  # nothing rotated
    bad = subprocess.run([sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), "--model.szie=6M"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "did you mean 'model.size'" in bad.stderr
