"""The lean RL step vs the full one: recompute + update time when zero-advantage trajectories skip both.

    python tools/bench_rl_step.py                          # the demo's shape: 1M model, 32 x 8 episodes
    python tools/bench_rl_step.py --size 6M --zero 0.5 0.75 0.9
    python tools/bench_rl_step.py --exact --zero 0 --repeats 6   # numerics=exact vs default, the full step

A synthetic batch shaped like the search demo's (``--prompts`` groups of ``--group`` trajectories,
``--seq`` tokens each of which the last ``--loss-tokens`` are the policy's, the rest prompt and
observation), with a fraction ``--zero`` of the groups given equal rewards (so zero advantages).
For each fraction, in this run: the full step (recompute every trajectory, train every
trajectory) and the lean step (recompute and train only the trajectories with a nonzero
advantage, normalisers on the whole batch), from the same weights. The table prints both times,
their ratio, and the relative difference of the gradient norms (the two steps are the same
update, so it should be at float32 rounding). Best of ``--repeats`` after one warm-up, 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from rich.console import Console
from rich.table import Table
from tensordict import TensorDict

from sidpt.batch import GROUP_ID, LOSS_MASK, REWARD, ROLLOUT_LOGPROBS, SEQ_LEN, TOKENS
from sidpt.model import SIZES, build_model
from sidpt.rl import apply_correction, compute_advantages
from sidpt.trainer import OptimConfig, Trainer, signal_rows


def make_batch(prompts: int, group: int, seq: int, loss_tokens: int, zero: float, vocab: int) -> TensorDict:
    g = torch.Generator().manual_seed(0)
    n = prompts * group
    seq_len = seq - torch.randint(0, max(1, seq // 8), (n,), generator=g)  # a little raggedness
    pos = torch.arange(seq)[None, :]
    mask = (pos >= (seq_len - loss_tokens)[:, None]) & (pos < seq_len[:, None])
    n_zero = round(zero * prompts)
    reward = torch.randint(0, 2, (prompts, group), generator=g).float()
    reward[:, 0], reward[:, 1] = 0.0, 1.0  # every group mixed ...
    reward[:n_zero] = 1.0  # ... but the first n_zero, all right
    return TensorDict({
        TOKENS: torch.randint(0, vocab, (n, seq), generator=g), SEQ_LEN: seq_len, LOSS_MASK: mask,
        GROUP_ID: torch.arange(n) // group, REWARD: reward.flatten(),
        ROLLOUT_LOGPROBS: torch.where(mask, -torch.rand(n, seq, generator=g), 0.0),
    }, batch_size=[n])


def step(trainer: Trainer, batch: TensorDict, lean: bool) -> tuple[float, float]:
    """(seconds, grad norm) of recompute + correction + rl_step."""
    t = time.perf_counter()
    keep = signal_rows(batch, LOSS_MASK) if lean else None
    part, _ = apply_correction(trainer.recompute(batch, rows=keep), "token-tis")
    stats = trainer.rl_step(part, agg="token-mean", loss="ppo", loss_kwargs={}, kl_coef=0.0, entropy_coef=0.0,
                            keep=keep)
    return time.perf_counter() - t, stats["train/grad_norm"]


def bench_exact(model, a) -> None:
    """Recompute + update in numerics="exact" vs default: ``repeats`` rounds after a warm-up,
    alternating (the order flipped every round), fresh weights each time; best and median."""
    table = Table(title=f"recompute + RL update, numerics exact vs default, {a.size} (vocab {a.vocab}), "
                        f"{a.prompts} x {a.group} trajectories of {a.seq} tokens, {a.repeats} alternating rounds")
    for col in ("zero-adv groups", "default best s", "exact best s", "exact cost (best)", "default median s",
                "exact median s", "exact cost (median)"):
        table.add_column(col, justify="right")
    for zero in a.zero:
        batch = compute_advantages(make_batch(a.prompts, a.group, a.seq, a.loss_tokens, zero, a.vocab), "grpo")
        times = {"default": [], "exact": []}
        for r in range(a.repeats + 1):
            for m in (("default", "exact") if r % 2 == 0 else ("exact", "default")):
                trainer = Trainer(copy.deepcopy(model).set_numerics(m), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1e9, 16384))
                sec, _ = step(trainer, batch, lean=False)
                if r:  # the first round is a warm-up
                    times[m].append(sec)
        best = {m: min(t) for m, t in times.items()}
        med = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
        table.add_row(f"{zero:.0%}", f"{best['default']:.3f}", f"{best['exact']:.3f}",
                      f"{best['exact'] / best['default']:.2f}x", f"{med['default']:.3f}", f"{med['exact']:.3f}",
                      f"{med['exact'] / med['default']:.2f}x")
    Console().print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1M", choices=list(SIZES))
    ap.add_argument("--vocab", type=int, default=1932, help="the demo's word-level vocabulary")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seq", type=int, default=76, help="tokens per trajectory (the demo's mean: 75.5)")
    ap.add_argument("--loss-tokens", type=int, default=8, help="policy tokens per trajectory (demo: 7.4)")
    ap.add_argument("--zero", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.875],
                    help="fractions of groups with equal rewards (the demo: 0.74-0.88)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exact", action="store_true",
                    help="instead: the full step in numerics=exact vs default, alternating, same weights and batch")
    a = ap.parse_args()
    torch.set_num_threads(2)
    args = dataclasses.replace(SIZES[a.size], vocab_size=a.vocab)
    model = build_model(args, seed=0)
    if a.exact:
        return bench_exact(model, a)
    table = Table(title=f"recompute + RL update, {a.size} (vocab {a.vocab}), {a.prompts} x {a.group} trajectories "
                        f"of {a.seq} tokens ({a.loss_tokens} trained), best of {a.repeats}")
    for col in ("zero-advantage groups", "full s", "lean s", "full / lean", "grad-norm rel. diff"):
        table.add_column(col, justify="right")
    for zero in a.zero:
        batch = compute_advantages(make_batch(a.prompts, a.group, a.seq, a.loss_tokens, zero, a.vocab), "grpo")
        best, norms = {}, {}
        for lean in (False, True):
            for r in range(a.repeats + 1):  # fresh weights and optimiser each time: the same update
                trainer = Trainer(copy.deepcopy(model), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1e9, 16384))
                sec, gn = step(trainer, batch, lean)
                if r:  # the first is a warm-up
                    best[lean] = min(best.get(lean, float("inf")), sec)
                norms[lean] = gn
        diff = abs(norms[True] - norms[False]) / max(norms[False], 1e-12)
        table.add_row(f"{zero:.0%}", f"{best[False]:.3f}", f"{best[True]:.3f}",
                      f"{best[False] / best[True]:.2f}x", f"{diff:.1e}")
    Console().print(table)


if __name__ == "__main__":
    main()
