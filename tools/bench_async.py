"""The async pipeline against the synchronous runs, on the same CPU ranks and the long-tailed task.

    python tools/bench_async.py                       # 4 ranks: colocated, disaggregated sync, async x 4 schedules
    python tools/bench_async.py --ranks 3 --rollout-ranks 2 --rounds 2
    python tools/bench_async.py --report              # the table from the runs on disk

Every arm runs ``configs/echo.toml`` (copy a string of log-uniform length 1..48: response lengths
p90 / p10 >= 8) from one shared SFT warm-start (``--sft-steps``, saved once under ``--out``), for
``--steps`` GRPO steps, each rank on one thread, one arm at a time; ``--rounds`` repeats the whole
sequence in alternating order and keeps each arm's median (this machine's speed drifts):

    colocated      every role on all ranks, synchronous (the baseline of every ratio)
    disagg-sync    rollout ranks, then trainer ranks, synchronous
    async-<policy> the async pipeline with rollout.max_staleness = --k under train.schedule = policy

Figures over the steps after ``--warmup``: trained samples/s (trained trajectories / the RL steps'
wall time), idle fraction per role (colocated: the share of the step each role is not running;
async: the trainer's wait for trajectories and the rollout ranks' wait for admission), the trained
tokens' staleness histogram, and the bias figures of ``sidpt.schedule`` (whole-run trained /
sampled length and reward, the window ratios' mean, starvation, dropped trajectories).
Outputs: ``--out``/<arm>-r<round>/ (each run), ``--out``/summary.json and the printed table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("fifo", "group_complete", "paced", "debiased")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arms(a) -> dict[str, list[str]]:
    dis = ["--run.placement=disaggregated", f"--run.rollout_ranks={a.rollout_ranks}"]
    out = {"colocated": [], "disagg-sync": dis}
    for p in a.policies:
        out[f"async-{p}"] = [*dis, "--run.pipeline=async", f"--rollout.max_staleness={a.k}", f"--train.schedule={p}"]
    return out


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def warm_start(a, out: Path) -> Path:
    policy = out / "base" / "policy"
    if not (policy / "config.json").exists():
        run([sys.executable, "-m", "sidpt", str(ROOT / "configs/echo.toml"), f"--run.out_dir={out}", "--run.name=base",
             "--run.overwrite=true", "--run.steps=0", f"--sft.steps={a.sft_steps}", "--run.threads=1"],
            out / "base.log")
    return policy


def summarize(rows: list[dict], warmup: int, k: int, window: int) -> dict[str, float]:
    rl = [r for r in rows if "loss/total" in r][warmup:]
    wall = sum(r["time/step"] for r in rl)
    trained = sum(r.get("rollout/trained_seqs", r.get("rollout/episodes", 0.0)) for r in rl)
    mean = lambda key, rs=rl: statistics.fmean(r.get(key, 0.0) for r in rs) if rs else float("nan")  # noqa: E731
    out = {"steps": len(rl), "wall_s": wall, "trained": trained, "samples_per_s": trained / wall}
    if "time/wait" in rl[0]:  # async
        out["trainer_idle"] = sum(r["time/wait"] for r in rl) / wall
        out["rollout_idle"] = mean("perf/rollout_idle_frac")
        hist = [sum(r.get(f"staleness/tokens_{d}", 0.0) for r in rl) for d in range(k + 1)]
        out["staleness"] = [h / max(sum(hist), 1.0) for h in hist]
        out["staleness_mean"] = mean("staleness/mean")
        last = rl[-1]
        out.update({"length_ratio_run": last["bias/length_ratio_run"], "reward_ratio_run": last["bias/reward_ratio_run"],
                    "length_ratio_window": mean("bias/length_ratio", rl[window:]),
                    "reward_ratio_window": mean("bias/reward_ratio", rl[window:]),
                    "starved_low_pass": mean("bias/starved_low_pass", rl[2 * window:]), "dropped": last["sched/dropped"],
                    "mixed_version_seqs": sum(r.get("staleness/mixed_seqs", 0.0) for r in rl) / max(trained, 1.0)})
    else:  # synchronous: a role idles while the other runs
        roll = sum(r.get("time/rollout", 0.0) for r in rl)
        train = sum(r.get("time/train", 0.0) + r.get("time/recompute", 0.0) for r in rl)
        out["rollout_idle"], out["trainer_idle"] = 1 - roll / wall, 1 - train / wall
    tokens = [r.get("rollout/response_tokens", 0.0) for r in rl]
    out["response_tokens_mean"] = statistics.fmean(tokens) if tokens else float("nan")
    out["reward_mean"] = mean("reward/mean")
    return out


def report(a, out: Path, console: Console) -> dict:
    results: dict[str, list[dict]] = {}
    for arm in arms(a):
        for rd in range(a.rounds):
            path = out / f"{arm}-r{rd}" / "metrics.jsonl"
            if path.exists():
                rows = [json.loads(line) for line in path.read_text().splitlines()]
                results.setdefault(arm, []).append(summarize(rows, a.warmup, a.k, a.window))
    if "colocated" not in results:
        sys.exit(f"no colocated run under {out}")
    med = {arm: {key: statistics.median(r[key] for r in rs) if not isinstance(rs[0][key], list) else
                 [statistics.median(r[key][d] for r in rs) for d in range(len(rs[0][key]))] for key in rs[0]}
           for arm, rs in results.items()}
    base, fifo = med["colocated"]["samples_per_s"], med.get("async-fifo", {}).get("samples_per_s")
    t = Table(title=f"async pipeline, {a.ranks} ranks (disaggregated: {a.rollout_ranks} rollout), k = {a.k}, "
                    f"median of {a.rounds} round(s), steps {a.warmup}..{a.steps - 1}")
    for col in ("arm", "samples/s", "/ colocated", "/ async-fifo", "trainer idle", "rollout idle",
                f"staleness 0..{a.k}", "len ratio", "reward ratio", "len win", "reward win", "starved", "dropped"):
        t.add_column(col, justify="right" if col != "arm" else "left")
    f3 = lambda x: f"{x:.3f}"  # noqa: E731
    for arm, m in med.items():
        asy = "staleness" in m
        t.add_row(arm, f"{m['samples_per_s']:.1f}", f"{m['samples_per_s'] / base:.2f}x",
                  f"{m['samples_per_s'] / fifo:.2f}x" if fifo and asy else "",
                  f"{m['trainer_idle']:.2f}", f"{m['rollout_idle']:.2f}",
                  " ".join(f"{x:.2f}" for x in m["staleness"]) if asy else "",
                  *(f3(m[k]) if asy else "" for k in ("length_ratio_run", "reward_ratio_run", "length_ratio_window",
                                                       "reward_ratio_window", "starved_low_pass")),
                  f"{m['dropped']:.0f}" if asy else "")
    console.print(t)
    summary = {"args": vars(a), "median": med, "rounds": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--rollout-ranks", type=int, default=2)
    ap.add_argument("--k", type=int, default=2, help="rollout.max_staleness of the async arms")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3, help="first RL steps left out of the figures")
    ap.add_argument("--window", type=int, default=8, help="train.bias_window")
    ap.add_argument("--prompts", type=int, default=8, help="rollout.prompts_per_step")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_async")
    ap.add_argument("--report", action="store_true", help="only the table, from the runs on disk")
    a = ap.parse_args()
    out, console = ROOT / a.out, Console(width=200)
    out.mkdir(parents=True, exist_ok=True)
    if not a.report:
        policy = warm_start(a, out)
        names = list(arms(a).items())
        for rd in range(a.rounds):
            for arm, extra in (names if rd % 2 == 0 else names[::-1]):
                console.print(f"round {rd}: {arm}")
                run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks),
                     "--master-port", str(free_port()), "-m", "sidpt", str(ROOT / "configs/echo.toml"),
                     f"--model.path={policy}", "--sft.steps=0", f"--run.steps={a.steps}", f"--run.seed={a.seed}",
                     f"--run.out_dir={out}", f"--run.name={arm}-r{rd}", "--run.overwrite=true", "--run.threads=1",
                     f"--rollout.prompts_per_step={a.prompts}", f"--train.bias_window={a.window}", *extra],
                    out / f"{arm}-r{rd}.log")
    report(a, out, console)


if __name__ == "__main__":
    main()
