"""The repository's promises to a new user: the README's test command is what CI runs, and the entry works."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
         "--run.name=t", f"--env.dir={tmp_path / 'task'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "t" / "config.toml").read_text().count("[run]") == 1
    assert "held-out samples" in out.stdout and "exact match" in out.stdout
    rows = [json.loads(r) for r in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if "reward/mean" in r]
    sft = [r for r in rows if "sft/loss" in r]
    assert len(sft) == 60 and all("step" not in r and "sft_step" in r for r in sft)  # distinct step axes
    assert not {k for r in sft for k in r} & {k for r in rl for k in r}  # no curve shared by the phases
    assert len(rl) == 4  # one row per RL step of debug.toml
    # the debug recipe trains: some RL step reaches the policy-gradient update (issue 14, item 7)
    assert any(r["train/seqs"] > 0 and r["train/grad_norm"] > 0 for r in rl), [
        (r["reward/mean"], r["train/seqs"], r["train/grad_norm"]) for r in rl]
    assert (tmp_path / "t" / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final figures and the policy are saved; the policy, reloaded by an eval-only run, gives
    # the same held-out figures (issue 14, item 3)
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert res["rl_steps"] == 4 and res["stopped_by"] is None and set(res["evaluations"]) == {"before", "after"}
    evals = [r for r in rows if "eval/exact_match" in r]
    assert [r["eval/exact_match"] for r in evals] == [res["evaluations"][k]["exact_match"] for k in ("before", "after")]
    policy = tmp_path / "t" / "policy"
    assert (policy / "config.json").exists() and (policy / "tokenizer.json").exists()
    ev = subprocess.run(
        [sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), f"--run.out_dir={tmp_path}",
         "--run.name=e", f"--env.dir={tmp_path / 'task'}", f"--model.path={policy}", "--run.steps=0",
         "--sft.steps=0"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    res_e = json.loads((tmp_path / "e" / "results.json").read_text())
    assert set(res_e["evaluations"]) == {"before"} and "policy (no RL)" in ev.stdout and "after RL" not in ev.stdout
    assert res_e["evaluations"]["before"] == res["evaluations"]["after"]
    assert (tmp_path / "e" / "metrics.jsonl").read_text().count("eval/exact_match") == 1
    again = subprocess.run(  # a rerun under the same name is refused before anything is written
        [sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), f"--run.out_dir={tmp_path}",
         "--run.name=t", f"--env.dir={tmp_path / 'task'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr[-3000:]
    assert "holds an earlier run (config.toml, metrics.jsonl)" in again.stderr and "--run.overwrite=true" in again.stderr
    assert not list((tmp_path / "t").glob("metrics.*.jsonl"))  # nothing rotated
    bad = subprocess.run([sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), "--model.szie=6M"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "did you mean 'model.size'" in bad.stderr


def test_sigint_stops_at_a_step_boundary_and_saves(tmp_path):
    """Ctrl-C: the current step finishes, then the run evaluates and saves what a finished run saves
    (before: a 40-line traceback and nothing saved)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), f"--run.out_dir={tmp_path}",
         "--run.name=t", f"--env.dir={tmp_path / 'task'}", "--run.steps=500", "--sft.steps=5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"reward/mean"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT" in out
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert res["stopped_by"] == "SIGINT" and 1 <= res["rl_steps"] < 500 and "after" in res["evaluations"]
    assert (tmp_path / "t" / "policy" / "model.safetensors").exists()


def test_ctrl_c_under_torchrun_still_saves(tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both ranks (one process group); torchrun then passes
    it on to the ranks again. That echo must not count as a second Ctrl-C: before, every rank
    stopped mid-evaluation and nothing was saved. Disaggregated 1 + 1 ranks."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         "-m", "sidpt", str(ROOT / "configs" / "debug.toml"), f"--run.out_dir={tmp_path}", "--run.name=t",
         f"--env.dir={tmp_path / 'task'}", "--run.steps=2000", "--sft.steps=5", "--run.placement=disaggregated",
         "--run.rollout_ranks=1", "--run.threads=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"reward/mean"' in metrics.read_text()):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    out, err = proc.communicate(timeout=240)
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert res["stopped_by"] == "SIGINT" and 1 <= res["rl_steps"] < 2000 and "after" in res["evaluations"], err[-3000:]
    assert (tmp_path / "t" / "policy" / "model.safetensors").exists()


def test_stop_request_ignores_the_launchers_echo_of_a_ctrl_c(monkeypatch):
    """The first SIGINT sets the flag; a repeat within StopRequest.ECHO_S (torchrun passing the
    terminal's Ctrl-C on) is ignored; a later one is a second Ctrl-C and interrupts at once."""
    import os

    import torch

    from sidpt.dist.world import World
    from sidpt.startup import StopRequest

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    clock = iter([100.0, 100.3, 101.5])  # the handler's three readings
    import sidpt.startup
    from types import SimpleNamespace

    monkeypatch.setattr(sidpt.startup, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    try:
        stop = StopRequest(World(0, 1, 0, torch.device("cpu")))
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C
        try:
            os.kill(os.getpid(), signal.SIGINT)  # 0.3 s later: the launcher's echo
            time.sleep(0.1)
        except KeyboardInterrupt:
            pytest.fail("the launcher's echo of the first Ctrl-C was taken for a second one")
        assert stop.requested() and stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # 1.5 s after the first: a second Ctrl-C
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_readme_disaggregated_command_runs(tmp_path):
    """The README's disaggregated launch, as written (plus where to write): 1 rollout + 2 trainer ranks."""
    import os

    cmd = "NGPU=3 ./torchrun.sh configs/debug.toml --run.placement=disaggregated --run.rollout_ranks=1"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert " ".join(cmd.split()) in readme.replace("`", "")
    env = {**os.environ, "NGPU": "3", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["./torchrun.sh", "configs/debug.toml", "--run.placement=disaggregated", "--run.rollout_ranks=1",
                          f"--run.out_dir={tmp_path}", f"--env.dir={tmp_path / 'task'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "disaggregated (rollout [0], trainer [1, 2])" in out.stdout
    res = json.loads((tmp_path / "debug" / "results.json").read_text())
    assert res["rl_steps"] == 4 and "after" in res["evaluations"]
    rows = [json.loads(line) for line in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert sum("sft_step" in r for r in rows) == 60 and sum("loss/total" in r for r in rows) == 4
