"""A run directory's metrics as PNGs a person can read.

    python tools/plot_run.py runs/debug              # -> runs/debug/plots/*.png
    python tools/plot_run.py runs/debug --out DIR

Reads ``metrics.jsonl`` (the RL rows: those with ``step`` and ``waterfall/*``; the evaluations:
``eval/*``) and ``results.json`` (the run's RLU and waterfall), and draws, each with a title,
labelled axes with units and a legend:

    reward.png      the training reward per RL step and the held-out score at each evaluation
    mismatch.png    trainer-inference mismatch per step: KL(mu || pi_old) (k3) and chi-square,
                    and the ESS fraction of the importance weights
    rlu.png         RLU and its factors U_hw, eta_use, eta_ess per step, the run's as dashed lines
    waterfall.png   device time by phase per step as stacked bars (% of devices x wall), with the
                    run's bar last
    staleness.png   trained tokens by staleness (async runs: versions between sampling and training)

A figure whose metrics the run did not log is skipped and named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sidpt.utilisation import PHASES, ROLES  # noqa: E402

# one colour per phase, the same in every figure (tab10 order; "other" grey)
COLOURS = dict(zip((*PHASES, "between_steps", "other"),
                   ("tab:blue", "tab:olive", "tab:cyan", "tab:pink", "tab:orange", "tab:red", "tab:purple",
                    "tab:brown", "lightgray", "silver", "dimgray")))


def load(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """The RL rows, the evaluation rows and results.json's contents ({} if absent)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no metrics (is {run_dir} a run directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rl = [r for r in rows if "step" in r and ("reward/mean" in r or "rlu/rlu" in r)]
    evals = [r for r in rows if "step" in r and any(k.startswith("eval/") for k in r)]
    res = run_dir / "results.json"
    return rl, evals, json.loads(res.read_text()) if res.exists() else {}


def save(fig, path: Path) -> None:
    """Atomically, with integer step ticks on every per-step axis."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "RL step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def label(ax, ylabel: str, title: str, xlabel: str = "RL step", **legend) -> None:
    """Axis labels with units, the title, a light grid and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend.pop("fontsize", 8), **legend)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_reward(rl, evals, out: Path) -> str | None:
    x, y = series(rl, "reward/mean")
    if not x:
        return "no reward/mean"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(x, y, "-", color="tab:blue", label="training reward (mean of the step's trajectories)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward (0 to 1)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    key = next((k for k in ("eval/exact_match", "eval/accuracy", "eval/f1", "eval/reward") if any(k in r for r in evals)),
               None)
    if key:
        ax2 = ax.twinx()
        ex, ey = series(evals, key)
        ax2.plot(ex, ey, "o--", color="tab:red", label=f"held-out {key.removeprefix('eval/')} (greedy)")
        ax2.set_ylabel(f"held-out {key.removeprefix('eval/')} (%)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    ax.set_title("Reward and held-out score")
    save(fig, out / "reward.png")
    return None


def plot_mismatch(rl, out: Path) -> str | None:
    if not any("mismatch/kl_k3" in r for r in rl):
        return "no mismatch/* (no step trained)"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, text in (("mismatch/kl_k3", "KL(mu || pi_old), k3 estimator"),
                       ("mismatch/chi2_token", "chi-square per token, E[rho^2] - 1")):
        x, y = series(rl, key)
        ax.plot(x, y, "o-", markersize=3, label=text)
    ax.set_yscale("symlog", linthresh=1e-6)
    label(ax, "divergence (nats; symlog)", "Trainer-inference mismatch")
    for key, text in (("mismatch/ess_ratio", "ESS of rho = pi_old / mu"),
                       ("mismatch/ess_weight", "ESS of the applied weights (eta_ess)")):
        x, y = series(rl, key)
        bx.plot(x, y, "o-", markersize=3, label=text)
    label(bx, "effective sample size / n (0 to 1)", "Importance weights")
    save(fig, out / "mismatch.png")
    return None


def plot_rlu(rl, util: dict, out: Path) -> str | None:
    if not any("rlu/rlu" in r for r in rl):
        return "no rlu/* (a run before issue 20)"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, text, colour in (("rlu/u_hw", "U_hw: roofline time / device time", "tab:blue"),
                               ("rlu/eta_use", "eta_use: share on weighted tokens", "tab:green"),
                               ("rlu/eta_ess", "eta_ess: ESS fraction", "tab:orange")):
        x, y = series(rl, key)
        ax.plot(x, y, "o-", markersize=3, color=colour, label=f"{text} (per step)")
        if key in util:
            ax.axhline(util[key], color=colour, linestyle="--", linewidth=1,
                       label=f"{text.split(':')[0]} over the run = {util[key]:.3g}")
    ax.set_ylim(0, 1.05)
    label(ax, "fraction (0 to 1)", "The factors of RLU", fontsize=7, loc="center right")
    x, y = series(rl, "rlu/rlu")
    bx.plot(x, y, "o-", markersize=3, color="black", label="RLU per step (0: no token of the step taught)")
    if "rlu/rlu" in util:
        bx.axhline(util["rlu/rlu"], color="black", linestyle="--", linewidth=1,
                   label=f"RLU over the run = {util['rlu/rlu']:.3g}")
    bx.set_ylim(bottom=0)
    label(bx, "RLU (fraction of the devices' peak)", "RL utilisation RLU = U_hw x eta_use x eta_ess", fontsize=7)
    save(fig, out / "rlu.png")
    return None


def plot_waterfall(rl, util: dict, out: Path) -> str | None:
    rows = [r for r in rl if "waterfall/other" in r]
    if not rows:
        return "no waterfall/*"
    names = [p for p in (*PHASES, "between_steps", "other")
             if any(abs(r.get(f"waterfall/{p}", 0.0)) > 1e-4 for r in rows + [util])]
    bars, labels = bin_steps(rows, [f"waterfall/{p}" for p in names])
    bars, labels = bars + ([util] if util else []), labels + (["run"] if util else [])
    for role in ROLES:  # the run's waterfall of each role's ranks (disaggregated runs)
        if f"waterfall_{role}/other" in util:
            bars.append({f"waterfall/{p}": util.get(f"waterfall_{role}/{p}", 0.0) for p in (*PHASES, "other")})
            labels.append(f"run: {role}")
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 0.25 * len(bars) + 3)), 4.8))
    bottom = [0.0] * len(bars)
    for p in names:
        h = [100 * max(b.get(f"waterfall/{p}", 0.0), 0.0) for b in bars]
        ax.bar(range(len(bars)), h, bottom=bottom, color=COLOURS.get(p, "gray"), label=p.replace("_", " "))
        bottom = [a + b for a, b in zip(bottom, h)]
    ax.set_xticks(range(len(bars)), labels, fontsize=7 if len(bars) > 20 else 9,
                  rotation=60 if len(bars) > 20 else 0)
    ax.set_xlabel("RL steps (long runs: steps pooled by device time); the run, with the time between steps; "
                  "the run by role")
    ax.set_ylabel("% of devices x wall time")
    ax.set_ylim(0, 100)
    ax.set_title("Where the device time went (waterfall by phase, all ranks)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save(fig, out / "waterfall.png")
    return None


def bin_steps(rows: list[dict], keys: list[str], most: int = 40) -> tuple[list[dict], list[str]]:
    """At most ``most`` bars: consecutive steps pooled, each share weighted by its step's device
    time (``rlu/device_s``), labelled by their step range."""
    k = -(-len(rows) // most)
    if k == 1:
        return rows, [str(r["step"]) for r in rows]
    bars, labels = [], []
    for i in range(0, len(rows), k):
        part = rows[i:i + k]
        dev = [r.get("rlu/device_s", 1.0) for r in part]
        bars.append({key: sum(r.get(key, 0.0) * d for r, d in zip(part, dev)) / sum(dev) for key in keys})
        labels.append(f"{part[0]['step']}-{part[-1]['step']}")
    return bars, labels


def plot_staleness(rl, out: Path) -> str | None:
    ds = sorted({int(k.rsplit("_", 1)[1]) for r in rl for k in r if k.startswith("staleness/tokens_")})
    if not ds:
        return "no staleness/* (a synchronous run)"
    counts = [sum(r.get(f"staleness/tokens_{d}", 0.0) for r in rl) for d in ds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(ds, counts, color="tab:purple", label=f"trained tokens over {len(rl)} steps")
    ax.set_xticks(ds)
    ax.set_xlabel("staleness (policy versions between sampling and training)")
    ax.set_ylabel("trained tokens")
    ax.set_title("Staleness of the trained tokens")
    ax.legend(fontsize=8)
    save(fig, out / "staleness.png")
    return None


def plot_run(run_dir: Path, out: Path | None = None) -> dict[str, str | None]:
    """Every figure of ``run_dir`` into ``out`` (default ``run_dir/plots``); returns name -> None
    (drawn) or why it was skipped."""
    rl, evals, results = load(run_dir)
    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    util = results.get("utilisation", {})
    return {"reward.png": plot_reward(rl, evals, out), "mismatch.png": plot_mismatch(rl, out),
            "rlu.png": plot_rlu(rl, util, out), "waterfall.png": plot_waterfall(rl, util, out),
            "staleness.png": plot_staleness(rl, out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: RUN_DIR/plots)")
    a = ap.parse_args()
    out = a.out or a.run_dir / "plots"
    for name, why in plot_run(a.run_dir, out).items():
        print(f"{out / name}" if why is None else f"{name}: skipped ({why})")


if __name__ == "__main__":
    main()
