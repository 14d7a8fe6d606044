"""The repository's promises to a new user: the README's test command is what CI runs, and the entry works."""

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
         "--run.name=t"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "t" / "config.toml").read_text().count("[run]") == 1
    bad = subprocess.run([sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), "--model.szie=6M"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "did you mean 'model.size'" in bad.stderr
