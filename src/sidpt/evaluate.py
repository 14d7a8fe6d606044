"""Held-out evaluation for any environment, and what a run reports at its end.

``evaluate`` runs greedy episodes on the held-out samples, sharded over the rollout mesh; the
environment's ``Task.metrics`` gives the statistics as (sum, count) pairs, summed over the rollout
ranks. The table's columns are the environment's ``eval_columns``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sidpt.dist.world import all_reduce_sum, gather_to_main
from sidpt.env import score
from sidpt.files import atomic_write
from sidpt.metrics import plot_reward_curve
from sidpt.rollout import SamplingParams
from sidpt.rollout.multiturn import Job, run_episodes


def reduce_metrics(sums: dict[str, tuple[float, float]], device, group,
                   totals: dict[str, float] | None = None) -> dict[str, float]:
    """name -> (sum, count) over this rank's episodes -> name -> sum / count over the group's ranks
    (a name with no count anywhere is left out); ``totals``: plain sums over the ranks. Every rank
    of ``group`` passes the same names (one all-reduce)."""
    keys, tkeys = sorted(sums), sorted(totals or {})
    flat = all_reduce_sum([v for k in keys for v in sums[k]] + [totals[k] for k in tkeys], device, group)
    out = {k: flat[2 * i] / flat[2 * i + 1] for i, k in enumerate(keys) if flat[2 * i + 1] > 0}
    out.update(zip(tkeys, flat[2 * len(keys):]))
    return out


def evaluate(engine, task, samples: list, prompt_ids, tok, max_new_tokens: int, world, dp: tuple[int, int],
             group, examples_path: Path | None = None, reward_fn=None,
             guard=None) -> dict[str, float]:
    """Greedy episodes on ``samples``, this rollout rank's share (``dp`` = (index, size));
    the task's metrics over all rollout ranks, and ``questions``. Writes what the policy wrote,
    one JSON line per sample in order, to ``examples_path`` on the main rank."""
    eos = () if tok.eos_id is None else (tok.eos_id,)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=eos)
    jobs = [Job(i, 0, q, prompt_ids(q), 0) for i, q in enumerate(samples) if i % dp[1] == dp[0]]
    eps = score(run_episodes(engine, task.env, jobs, params, tok.encode, tok.decode), reward_fn, tok.decode, guard)
    out = reduce_metrics(task.metrics(eps), world.device, group, totals={"questions": float(len(eps)),
                                                                           "faults": float(sum("fault" in e.info for e in eps))})
    if examples_path is not None:
        rows = [(e.group, json.dumps(task.example(e, tok.decode(e.out.tokens[e.out.prompt_len:])))) for e in eps]
        rows = sorted(gather_to_main(rows, world, group))  # every rank's episodes, in sample order
        if world.is_main:
            atomic_write(examples_path, "".join(line + "\n" for _, line in rows))
    return out


def describe(ev: dict[str, float], columns) -> str:
    """One evaluation as a line: each of the environment's columns, then the sample count."""
    return ", ".join(f"{title} {ev[key]:.2f}" for key, title in columns if key in ev) + f" ({int(ev['questions'])} samples)"


def summary(console: Console, results: dict, columns, run_dir: Path, curve) -> None:
    """The before/after table (the environment's columns that every evaluation has), the reward
    curve with the evaluations marked, and where the files are."""
    table = Table(title="held-out samples (greedy)")
    cols = [(k, t) for k, t in columns if all(k in ev for ev in results.values())]
    for title in ["", *(t for _, t in cols)]:
        table.add_column(title, justify="right")
    labels = {"before": "before RL", "resumed": "at resume", "after": "after RL"} if "after" in results else \
        {"before": "policy (no RL)", "resumed": "policy (at resume)"}
    labels = {k: v for k, v in labels.items() if k in results}
    for name, label in labels.items():
        table.add_row(label, *(f"{results[name][k]:.2f}" for k, _ in cols))
    console.print(table)
    if curve:
        first = columns[0][0]
        evals = {k: (len(curve) if k == "after" else 0, v[first]) for k, v in results.items() if first in v}
        plot_reward_curve(run_dir / "reward_curve.png", curve, evals)
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}" + (f", curve: {run_dir / 'reward_curve.png'}" if curve else ""))


def write_results(path: Path, results: dict, rl_steps: int, cfg, stopped_by: str | None, policy_dir: Path,
                  device: dict | None = None, utilisation: dict | None = None) -> None:
    """The run's final figures as JSON (atomic); ``device``: the main rank's peaks (``sidpt.flops``);
    ``utilisation``: RLU and the waterfall over the run (``sidpt.utilisation.rlu_row``)."""
    out = {"evaluations": results, "rl_steps": rl_steps, "rl_steps_configured": cfg.run.steps,
           "stopped_by": stopped_by, "policy": str(policy_dir), "held_out_questions": cfg.task.eval_questions,
           "environment": cfg.env.get("name"), "device_peaks": device, "utilisation": utilisation or {}}
    atomic_write(path, json.dumps(out, indent=1) + "\n")
