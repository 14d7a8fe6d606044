"""The mismatch lab: one GRPO recipe under each rollout precision / correction arm, >= 2 seeds.

    python tools/mismatch_lab.py                         # every arm, seeds 0 1, two runs at a time
    python tools/mismatch_lab.py --arms a b --seeds 0    # a subset
    python tools/mismatch_lab.py --report                # tables and plots from the runs on disk

Arms (the recipe: configs/arith.toml, a 0.1M-parameter model; one SFT warm-start (150 steps, seed
0) shared by every run, so that a seed varies only the RL sampling, then ``--steps`` GRPO steps at
``--lr``; every run on one thread, ``--jobs`` at a time):

    a  exact          model.numerics = "exact": trainer and engine bitwise equal (gap 0)
    b  low            the engine in ``--low`` emulated precision, uncorrected
    c  low + TIS      + token-level truncated IS (C = 2)
    d  low + IcePop   + IcePop's token mask on [0.5, 5]
    e  low + TR-mask  + sequence-level trust-region masking on the max per-token k3 (2026)
    f  speculative    the ``--low`` draft proposes 4 tokens, the exact policy accepts / resamples
    g  fp16           the engine in emulated fp16 instead, uncorrected
    h  bf16           the engine in emulated bf16, uncorrected

Each run's held-out accuracy is measured twice: through its own engine during training (the
``eval/accuracy`` curve: a low-precision server's view), and at the end from the saved policy in
exact float32 (the policy's own quality, which is what a mismatch can degrade). Outputs under
``--out`` (runs/mismatch_lab): ``<arm>.jsonl`` (every metrics row of every seed, with ``arm``
and ``seed``), ``<metric>.png`` per metric vs step (mean over seeds, one line per arm),
``summary.json`` and the summary table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

ARMS = {
    "a": ("exact", ["--model.numerics=exact"]),
    "b": ("low", ["--rollout.precision=emulated-{low}"]),
    "c": ("low + token-TIS", ["--rollout.precision=emulated-{low}", "--algo.correction=token-tis"]),
    "d": ("low + IcePop", ["--rollout.precision=emulated-{low}", "--algo.correction=icepop"]),
    "e": ("low + TR-mask", ["--rollout.precision=emulated-{low}", "--algo.correction=tr-mask"]),
    "f": ("speculative", ["--model.numerics=exact", "--rollout.speculative=4", "--rollout.draft_precision=emulated-{low}"]),
    "g": ("fp16", ["--rollout.precision=emulated-fp16"]),
    "h": ("bf16", ["--rollout.precision=emulated-bf16"]),
}
METRICS = {  # metric -> axis label
    "reward/mean": "mean reward (train)",
    "eval/accuracy": "held-out accuracy % (own engine)",
    "mismatch/kl_k3": "KL(mu || pi_old), k3 estimate",
    "mismatch/abs_log_ratio_max": "max |log pi_old - log mu|",
    "train/grad_norm": "gradient norm (before clipping)",
    "mismatch/low_prob_grad_share": "gradient share of tokens with mu < 1e-3",
    "train/entropy": "policy entropy (nats / token)",
}


def warm_start(args, log) -> Path:
    """The SFT warm-start every arm starts from (an SFT-only run of the recipe, seed 0)."""
    out = Path(args.out)
    policy = out / "warm" / "policy"
    if not (policy / "config.json").exists():
        with open(out / "warm.log", "w") as f:
            subprocess.run([sys.executable, "-m", "sidpt", args.config, f"--run.out_dir={out}", "--run.overwrite=true",
                            "--run.name=warm", "--run.steps=0", "--run.seed=0"] + args.set,
                           stdout=f, stderr=subprocess.STDOUT, check=True)
        log(f"warm-start: {policy}")
    return policy


def run_arm(arm: str, seed: int, args, log) -> Path:
    name = f"{arm}-s{seed}"
    out = Path(args.out)
    extra = [a.format(low=args.low) for a in ARMS[arm][1]]
    base = [sys.executable, "-m", "sidpt", args.config, f"--run.out_dir={out}", "--run.overwrite=true",
            "--run.threads=1", f"--run.seed={seed}", f"--run.steps={args.steps}", f"--train.lr={args.lr}",
            f"--run.eval_every={args.eval_every}", f"--model.path={out / 'warm' / 'policy'}", "--sft.steps=0"]
    t = time.perf_counter()
    with open(out / f"{name}.log", "w") as f:
        subprocess.run(base + [f"--run.name={name}"] + extra + args.set, stdout=f, stderr=subprocess.STDOUT, check=True)
        # the trained policy alone, in exact float32: an evaluation-only run of the saved checkpoint
        subprocess.run([sys.executable, "-m", "sidpt", args.config, f"--run.out_dir={out}", "--run.overwrite=true",
                        "--run.threads=1", f"--run.name={name}-final", f"--model.path={out / name / 'policy'}",
                        "--run.steps=0", "--sft.steps=0", "--model.numerics=exact"] + args.set,
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    log(f"{name}: {time.perf_counter() - t:.0f} s")
    return out / name


def load(out: Path, arm: str, seed: int) -> tuple[list[dict], float | None]:
    rows = [json.loads(line) for line in open(out / f"{arm}-s{seed}" / "metrics.jsonl")]
    final = out / f"{arm}-s{seed}-final" / "results.json"
    acc = json.load(open(final))["evaluations"]["before"]["accuracy"] if final.exists() else None
    return rows, acc


def label(arm: str, low: str) -> str:
    return ARMS[arm][0].replace("low", low)


def report(out: Path, arms: list[str], seeds: list[int], console: Console, last: int, low: str = "fp8") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    for arm in arms:
        per_seed = {}
        for s in seeds:
            if (out / f"{arm}-s{s}" / "metrics.jsonl").exists():
                per_seed[s] = load(out, arm, s)
        if not per_seed:
            continue
        data[arm] = per_seed
        with open(out / f"{arm}.jsonl", "w") as f:
            for s, (rows, _) in per_seed.items():
                for r in rows:
                    f.write(json.dumps({"arm": arm, "seed": s, **r}) + "\n")
    for metric, axis in METRICS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, per_seed in data.items():
            curves = [{r["step"]: r[metric] for r in rows if metric in r} for rows, _ in per_seed.values()]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(steps, [statistics.mean(c[t] for c in curves) for t in steps], label=f"{arm}: {label(arm, low)}")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(axis)
        ax.set_title(f"{axis} (mean over {len(seeds)} seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{metric.replace('/', '_')}.png", dpi=110)
        plt.close(fig)

    def tail_mean(rows, key):
        v = [r[key] for r in rows if key in r and "sft_step" not in r]
        return statistics.mean(v[-last:]) if v else float("nan")

    summary = {}
    for arm, per_seed in data.items():
        finals = [acc for _, acc in per_seed.values() if acc is not None]
        summary[arm] = {
            "name": label(arm, low), "seeds": sorted(per_seed),
            "final_exact_acc": finals,
            "final_engine_acc": [[r["eval/accuracy"] for r in rows if "eval/accuracy" in r][-1] for rows, _ in per_seed.values()],
            **{k: statistics.mean(tail_mean(rows, k) for rows, _ in per_seed.values()) for k in METRICS if k != "eval/accuracy"},
            "max_abs_log_ratio_all": max(max((r.get("mismatch/abs_log_ratio_max", 0.0) for r in rows), default=0.0)
                                         for rows, _ in per_seed.values()),
            "frac_tokens_masked": statistics.mean(tail_mean(rows, "mismatch/frac_tokens_masked") for rows, _ in per_seed.values()),
            "spec_accept_rate": statistics.mean(tail_mean(rows, "rollout/spec_accept_rate") for rows, _ in per_seed.values()),
            "time_per_step": statistics.mean(tail_mean(rows, "time/step") for rows, _ in per_seed.values()),
            "rollout_time": statistics.mean(tail_mean(rows, "time/rollout") for rows, _ in per_seed.values()),
        }
    def mean_sd(v):
        return (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else float("nan")) if v else (float("nan"),) * 2

    a_mean, a_sd = mean_sd(summary.get("a", {}).get("final_exact_acc") or [])
    t = Table(title=f"mismatch lab: {out} (last {last} steps; final accuracy from the saved policy in exact fp32)")
    for c in ("arm", "final acc % (seeds)", "mean +- sd", "vs (a)", "reward", "KL k3", "max |log r|",
              "grad norm", "low-p share", "entropy", "masked", "accept", "rollout s", "s/step"):
        t.add_column(c, justify="right")
    for arm, s in summary.items():
        m, sd = mean_sd(s["final_exact_acc"])
        n = max(len(s["final_exact_acc"]), 1)
        # within the noise of (a): |difference of means| <= 2 standard errors of that difference
        se = ((a_sd ** 2 + sd ** 2) / n) ** 0.5
        s["vs_a"] = m - a_mean
        s["within_noise_of_a"] = bool(abs(m - a_mean) <= 2 * se)
        verdict = "" if arm == "a" else f"{m - a_mean:+.1f} ({'within' if s['within_noise_of_a'] else 'outside'} 2 SE)"
        t.add_row(f"{arm}: {s['name']}", " / ".join(f"{v:.0f}" for v in s["final_exact_acc"]), f"{m:.1f} +- {sd:.1f}",
                  verdict, f"{s['reward/mean']:.3f}", f"{s['mismatch/kl_k3']:.1e}", f"{s['max_abs_log_ratio_all']:.3f}",
                  f"{s['train/grad_norm']:.2f}", f"{s['mismatch/low_prob_grad_share']:.3f}", f"{s['train/entropy']:.3f}",
                  f"{s['frac_tokens_masked']:.3f}",
                  "-" if s["spec_accept_rate"] != s["spec_accept_rate"] else f"{s['spec_accept_rate']:.3f}",
                  f"{s['rollout_time']:.3f}", f"{s['time_per_step']:.2f}")
    console.print(t)
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--config", default="configs/arith.toml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--low", default="fp8", choices=["bf16", "fp16", "fp8"], help="the low precision of arms b-f")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    ap.add_argument("--last", type=int, default=20, help="steps averaged at the end")
    ap.add_argument("--out", default="runs/mismatch_lab")
    ap.add_argument("--set", nargs="*", default=[], help="extra --a.b=v overrides for every run")
    ap.add_argument("--report", action="store_true", help="only the tables and plots of the runs on disk")
    args = ap.parse_args()
    console = Console(width=220)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        env_note = f"{os.cpu_count()} CPUs, {args.jobs} runs at a time"
        console.print(f"mismatch lab: arms {' '.join(args.arms)}, seeds {args.seeds}, {args.steps} steps, lr {args.lr}, "
                      f"low precision {args.low}; {env_note}")
        warm_start(args, console.print)
        jobs = [(a, s) for s in args.seeds for a in args.arms]
        with ThreadPoolExecutor(args.jobs) as pool:
            for f in [pool.submit(run_arm, a, s, args, console.print) for a, s in jobs]:
                f.result()
    report(out, args.arms, args.seeds, console, args.last, args.low)


if __name__ == "__main__":
    main()
