"""Fault drill: inject each fault of issue 19 into a short CPU run and print what became of it.

    python tools/fault_drill.py                     # every fault (about 5 minutes on 2 cores)
    python tools/fault_drill.py --only sigkill,reward --out runs/drill

Every run is ``configs/debug.toml`` (the tiny search task, a debug-size model, 20 SFT steps, 6 RL
steps of 8 groups x 4, a checkpoint every 2 steps), one thread per rank. A reference run without
faults (for the 2-rank SIGKILL, a 2-rank one) is the yardstick of "data lost". Columns:

    detected    the run (or the loader) named the fault: the message it printed, or the count it logged
    survived    the job completed (or, for a refusal, refused before touching anything)
    data lost   none, when what the fault could destroy is intact: the final weights equal the
                reference run's (checkpoint faults: bitwise); every episode accounted for, scored
                or faulted-and-logged (isolation faults); the run directory unchanged (refusals)
    recover     seconds from the fault to training again: SIGKILL, the kill to the restarted
                attempt's "resumed from"; a corrupt checkpoint, the restart to "resumed from";
                isolated faults, the longest a faulted call held the rollout (the timeout); 0 when
                the run never stopped

The faults: a rank SIGKILLed under ``torchrun --max-restarts 1`` (colocated 2 ranks, and the async
pipeline at max_staleness 2 on 3 ranks), a truncated newest checkpoint, a full disk while a
checkpoint is written (``RLIMIT_FSIZE`` between the policy's size and the checkpoint's: the kernel
refuses the write with EFBIG), malformed rows in the task's files (``env.bad_rows = "skip"``), a
reward function and an environment step that raise or hang (``task.call_timeout_s = 1``), a
non-finite gradient (in process: NaN in a trainer's gradient), a resume from another config's run
directory, and a checkpoint whose pickled metadata would run code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--sft.steps=20", "--rollout.prompts_per_step=8", "--train.lr=1e-3", "--run.checkpoint_every=2",
          "--run.threads=1", "--run.steps=6"]
ECHO = ["--sft.steps=30", "--run.steps=12", "--rollout.prompts_per_step=4", "--rollout.group_size=4",
        "--env.n_train=200", "--env.n_sft=100", "--env.n_heldout=8", "--task.eval_questions=8", "--run.threads=1"]
EPISODES = 6 * 8 * 4  # RL episodes of a RECIPE run

# A user's reward module and environment that fail on some train samples (chosen by a checksum of
# the sample id: deterministic, and never an SFT or held-out sample).
FAULTY = '''
import time, zlib
from sidpt.env.search import Config, make_task as _make_task

def _pick(sample, mod):
    return zlib.crc32(str(sample.id).encode()) % mod == 0

def reward(sample, text, info):
    if _pick(sample, 7):
        raise KeyError("gold answer missing (injected)")
    if _pick(sample, 11):
        time.sleep(3.0)  # past task.call_timeout_s
    return float(info.get("f1", 0.0))

class Flaky:
    def __init__(self, env, train_ids):
        self.env, self.train_ids, self.stop_strings = env, train_ids, env.stop_strings
    def reset(self, sample):
        return self.env.reset(sample)
    def step(self, state, text):
        if str(state.sample.id) in self.train_ids and _pick(state.sample, 7):
            raise ConnectionError("retriever unreachable (injected)")
        if str(state.sample.id) in self.train_ids and _pick(state.sample, 11):
            time.sleep(3.0)
        return self.env.step(state, text)
    def end(self, state, finish):
        return self.env.end(state, finish)
    def __getattr__(self, name):
        return getattr(self.env, name)

def make_task(cfg, is_main, need_sft):
    task = _make_task(cfg, is_main, need_sft)
    task.env = Flaky(task.env, {str(q.id) for q in task.train})
    return task
'''


@dataclass
class Result:
    rc: int
    lines: list = field(default_factory=list)  # (seconds since start, stream, text)
    wall: float = 0.0

    def first(self, text: str) -> float | None:
        return next((t for t, _, line in self.lines if text in line), None)

    def text(self) -> str:
        return "\n".join(line for _, _, line in self.lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 1, elastic: bool = False, fsize: int | None = None,
           pythonpath: str = "", config: str = "configs/debug.toml") -> Result:
    """One sidpt run (a process, or torchrun), its output lines time-stamped as they come."""
    if nproc == 1 and not elastic:
        cmd = [sys.executable, "-m", "sidpt"]
    else:
        rdzv = (["--max-restarts", "1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}"] if elastic
                else ["--master-port", str(_free_port())])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *rdzv, "-m", "sidpt"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), pythonpath) if p),
           "OMP_NUM_THREADS": "1"}

    def limit():  # the child's file-size limit: writes beyond it fail with EFBIG (sidpt ignores SIGXFSZ)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, str(ROOT / config), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    res = Result(0)

    def read(stream, name):
        for line in stream:
            res.lines.append((time.perf_counter() - t0, name, line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(s, n)) for s, n in ((proc.stdout, "out"), (proc.stderr, "err"))]
    for t in readers:
        t.start()
    res.rc = proc.wait(timeout=1800)
    for t in readers:
        t.join()
    res.wall = time.perf_counter() - t0
    return res


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run_dir / "policy").glob("*.safetensors")))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def rl_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r]


def common(out: Path, name: str) -> list[str]:
    return [f"--run.out_dir={out}", f"--env.dir={out / 'task'}", f"--run.name={name}"]


def _said(res: Result, text: str) -> str:
    line = next((line for _, _, line in res.lines if text in line), "")
    return line.strip()[:170]


# -- the faults: each returns (detected, survived, data lost, recover seconds or text) -------------


def sigkill(out: Path, ref: Path):
    ref2 = launch([*RECIPE, *common(out, "reference_2ranks")], nproc=2)  # 2 ranks reduce in another order than 1
    res = launch([*RECIPE, *common(out, "sigkill"), "--run.resume=auto", "--run.kill_rank=1", "--run.kill_step=3"],
                 nproc=2, elastic=True)
    died, back = res.first("exitcode: -9"), res.first("resumed from")
    lost = "none" if ref2.rc == res.rc == 0 and same_weights(out / "reference_2ranks", out / "sigkill") else "weights differ"
    return (f"rank 1 exitcode -9; {_said(res, 'resumed from')}", res.rc == 0, lost,
            None if died is None or back is None else back - died)


def sigkill_async(out: Path, ref: Path):
    args = [*ECHO, "--run.placement=disaggregated", "--run.pipeline=async", "--run.rollout_ranks=2",
            "--rollout.max_staleness=2", f"--run.out_dir={out}", "--run.name=sigkill_async", "--run.checkpoint_every=3",
            "--run.resume=auto", "--run.kill_rank=2", "--run.kill_step=7"]
    res = launch(args, nproc=3, elastic=True, config="configs/echo.toml")
    died, back = res.first("exitcode: -9"), res.first("resumed from")
    rows = rl_rows(out / "sigkill_async") if res.rc == 0 else []
    ok = len(rows) == 12 and all(r["sched/dropped"] == 0 and r["rollout/trained_seqs"] == 16 and r["staleness/max"] <= 2
                                 for r in rows)
    lost = ("none (12/12 steps of 16 samples, staleness <= 2, 0 dropped; not bitwise at k = 2)" if ok
            else "steps or samples missing")
    return (f"trainer exitcode -9; {_said(res, 'resumed from')}", res.rc == 0, lost,
            None if died is None or back is None else back - died)


def truncated(out: Path, ref: Path):
    first = launch([*RECIPE[:-1], "--run.steps=4", *common(out, "truncated")])
    ckpt = out / "truncated" / "checkpoints" / "step_000004"
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    res = launch([*RECIPE, *common(out, "truncated"), "--run.resume=auto"])
    lost = "none" if first.rc == res.rc == 0 and same_weights(ref, out / "truncated") else "weights differ"
    return (_said(res, "skipped:"), res.rc == 0, lost, res.first("resumed from"))


def disk_full(out: Path, ref: Path):
    first = launch([*RECIPE[:-1], "--run.steps=4", *common(out, "disk_full")])
    run_dir = out / "disk_full"
    policy = next((run_dir / "policy").glob("*.safetensors")).stat().st_size
    shard = next((run_dir / "checkpoints" / "step_000004").glob("*.distcp")).stat().st_size
    res = launch([*RECIPE, *common(out, "disk_full"), "--run.resume=auto"], fsize=(policy + shard) // 2)
    from sidpt.checkpoint import newest_checkpoint, verify

    kept = [p.name for p in sorted((run_dir / "checkpoints").glob("step_*"))]
    intact = verify(run_dir / "checkpoints" / "step_000004") is None and newest_checkpoint(run_dir, print).name == "step_000004"
    lost = "none" if first.rc == res.rc == 0 and intact and same_weights(ref, run_dir) else "weights or checkpoint lost"
    return (f"{_said(res, 'not written')} (kept: {', '.join(kept)})", res.rc == 0, lost, 0.0)


def malformed(out: Path, ref: Path):
    own = out / "own_task"  # the user's own task: the generated one with bad rows added
    shutil.copytree(out / "task", own, ignore=shutil.ignore_patterns("task.json", "*.bm25.json", "tokenizer*"))
    bad = {"train": "{not json", "heldout": '{"question": "who?"}', "corpus": '["a list"]', "sft": '{"id": 3}'}
    for name, row in bad.items():
        lines = (own / f"{name}.jsonl").read_text().splitlines()
        (own / f"{name}.jsonl").write_text("\n".join(lines[:3] + [row] + lines[3:]) + "\n")
    err = launch([*RECIPE, f"--run.out_dir={out}", f"--env.dir={own}", "--run.name=malformed_err"])
    res = launch([*RECIPE, f"--run.out_dir={out}", f"--env.dir={own}", "--run.name=malformed", "--env.bad_rows=skip"])
    listed = (out / "malformed" / "skipped_rows.txt").read_text().splitlines() if res.rc == 0 else []
    named = err.rc != 0 and ".jsonl:4" in err.text()
    lost = f"none ({len(listed)} of 4 bad rows listed in skipped_rows.txt)" if len(listed) == 4 else "rows unaccounted"
    return (f"error mode: {_said(err, '.jsonl:4')[:90] if named else 'NOT NAMED'}; skip mode: {len(listed)} "
            f"skipped, counted", res.rc == 0 and named, lost, 0.0)


def isolation(out: Path, name: str, args: list[str]):
    (out / "faulty").mkdir(exist_ok=True)
    (out / "faulty" / "drill_faults.py").write_text(FAULTY)
    res = launch([*RECIPE, *common(out, name), "--task.call_timeout_s=1", *args], pythonpath=str(out / "faulty"))
    if res.rc != 0:
        return (res.text()[-200:], False, "run failed", None)
    rows = rl_rows(out / name)
    faults = sum(r["rollout/faults"] for r in rows)
    logged = len((out / name / "faults_rank0.jsonl").read_text().splitlines())
    episodes = sum(r["rollout/episodes"] for r in rows)
    logs = [json.loads(line) for line in (out / name / "faults_rank0.jsonl").read_text().splitlines()]
    kinds = {row["error"].split(":")[0] for row in logs}
    ok = faults > 0 and episodes == EPISODES and logged >= faults
    lost = f"none ({episodes:.0f}/{EPISODES} episodes; {faults:.0f} faulted, scored 0, logged)" if ok else "episodes lost"
    return (f"rollout/faults {faults:.0f} ({', '.join(sorted(kinds))}); faults_rank0.jsonl {logged} rows (RL and "
            f"held-out)", True, lost, max(row["held_s"] for row in logs))  # the longest a faulted call held the rollout


def reward_fault(out: Path, ref: Path):
    return isolation(out, "reward", ["--task.reward=drill_faults:reward"])


def env_fault(out: Path, ref: Path):
    return isolation(out, "env_step", ["--env.name=drill_faults"])


def nonfinite(out: Path, ref: Path):
    from tensordict import TensorDict

    from sidpt.batch import LOSS_MASK, SEQ_LEN, TOKENS
    from sidpt.model import ModelArgs, build_model
    from sidpt.trainer import OptimConfig, Trainer

    t = Trainer(build_model(ModelArgs(vocab_size=47), seed=2), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1.0, 4096))
    tokens = torch.randint(0, 47, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 5:] = True
    batch = TensorDict({TOKENS: tokens, SEQ_LEN: torch.full((4,), 12), LOSS_MASK: mask}, batch_size=[4])
    t.sft_step(batch)
    before = ({n: p.clone() for n, p in t.model.named_parameters()},
              {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in t.opt.state_dict()["state"].items()})
    w = next(t.model.parameters())
    hook = w.register_hook(lambda g: g * float("nan"))
    stats = t.sft_step(batch)
    hook.remove()
    same = all(torch.equal(p, before[0][n]) for n, p in t.model.named_parameters()) and all(
        torch.equal(v, before[1][i][k]) for i, s in t.opt.state_dict()["state"].items() for k, v in s.items()
        if torch.is_tensor(v))
    after = t.sft_step(batch)["train/skipped_nonfinite"]
    return (f"train/skipped_nonfinite {stats['train/skipped_nonfinite']:.0f} (grad norm {stats['train/grad_norm']})",
            after == 0.0, "none (weights and AdamW bitwise untouched)" if same else "weights changed", 0.0)


def other_config(out: Path, ref: Path):
    def files():  # the run's data (the refusal writes its traceback to error.log, nothing else)
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in ref.rglob("*") if p.is_file()
                and p.name != "error.log"}

    before = files()
    res = launch([*RECIPE, *common(out, ref.name), "--run.resume=auto", "--train.lr=3e-3"])
    return (_said(res, "another config"), res.rc != 0 and "train.lr" in res.text(),
            "none (run directory unchanged)" if files() == before else "run directory changed", 0.0)


def crafted(out: Path, ref: Path):
    from sidpt.checkpoint import MANIFEST, load_training_state, verify
    from sidpt.model import CheckpointError, build_model, read_args
    from sidpt.trainer import OptimConfig, Trainer

    src = sorted((ref / "checkpoints").glob("step_*"))[-1]
    ckpt = out / "crafted" / "checkpoints" / src.name
    shutil.copytree(src, ckpt)
    marker = out / "crafted" / "code_ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = pickle.dumps(Evil())
    (ckpt / ".metadata").write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest[".metadata"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    assert verify(ckpt) is None
    t = Trainer(build_model(read_args(ckpt), seed=0), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1.0, 4096))
    try:
        load_training_state(t, ckpt, rank=0, group=None)
        said = "loaded"
    except CheckpointError as e:
        said = str(e).split(": ", 1)[1][:90]
    return (said, not marker.exists() and said != "loaded", "none (no code ran)" if not marker.exists() else "CODE RAN",
            0.0)


FAULTS = {
    "sigkill": ("SIGKILL of a rank (2 ranks, torchrun --max-restarts 1)", sigkill),
    "sigkill_async": ("SIGKILL of the trainer (async k=2, 3 ranks)", sigkill_async),
    "truncated": ("newest checkpoint truncated", truncated),
    "disk_full": ("disk full while writing a checkpoint", disk_full),
    "malformed": ("malformed rows in 4 task files", malformed),
    "reward": ("reward function raises / hangs", reward_fault),
    "env": ("environment step raises / hangs", env_fault),
    "nonfinite": ("non-finite gradient (in process)", nonfinite),
    "config": ("resume a run dir of another config", other_config),
    "crafted": ("checkpoint metadata that runs code", crafted),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fault_drill")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(FAULTS)}")
    a = ap.parse_args(argv)
    only = [f for f in a.only.split(",") if f] or list(FAULTS)
    if unknown := [f for f in only if f not in FAULTS]:
        ap.error(f"--only: unknown fault(s) {unknown}; choose from {list(FAULTS)}")
    console = Console(width=200)
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    ref = a.out / "reference"
    with console.status("reference run (no fault)"):
        res = launch([*RECIPE, *common(a.out, "reference")])
    if res.rc != 0:
        console.print(res.text()[-3000:])
        return 1
    table = Table(title=f"fault drill ({os.cpu_count()} CPUs; reference run {res.wall:.0f} s)")
    for col in ("fault", "detected", "survived", "data lost", "recover s"):
        table.add_column(col, overflow="fold")
    rows = []
    for key in only:
        title, fn = FAULTS[key]
        with console.status(f"{title} ..."):
            t0 = time.perf_counter()
            detected, survived, lost, recover = fn(a.out, ref)
        rec = recover if isinstance(recover, str) else ("?" if recover is None else f"{recover:.1f}")
        rows.append({"fault": title, "detected": detected, "survived": bool(survived), "data_lost": lost,
                     "recover_s": recover, "drill_s": time.perf_counter() - t0})
        table.add_row(title, detected, "yes" if survived else "NO", lost, rec)
        console.print(f"{title}: {'survived' if survived else 'NOT SURVIVED'}, data lost: {lost}")
    console.print(table)
    (a.out / "summary.json").write_text(json.dumps(rows, indent=1))
    ok = all(r["survived"] and r["data_lost"].startswith("none") for r in rows)
    console.print("[green]every fault survived, nothing lost[/]" if ok else "[red]a fault was not survived[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
