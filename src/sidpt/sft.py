"""The supervised warm-start, for any environment: its ideal trajectories, cross-entropy steps.

The environment supplies the trajectories (``Task.sft_episodes``); each is tokenized as the rollout
would see it (prompt, then each turn on its own), with the loss on the model's turns and EOS
appended (the policy learns to stop). Each step draws ``sft.batch_size`` trajectories from
(seed, step), the same on every rank, and the trainer ranks split them by dp rank.
"""

from __future__ import annotations

from sidpt.data import episode_tensors, sft_batch, step_indices
from sidpt.trainer import lr_at


def sft_rows(task, prompt_ids, tok, n: int, seed: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) of up to ``n`` ideal trajectories, EOS appended."""
    eos = [] if tok.eos_id is None else [tok.eos_id]
    rows = [episode_tensors(ep, prompt_ids(ep.sample), tok.encode) for ep in task.sft_episodes(n, seed)]
    if not rows:
        raise ValueError("sft.steps > 0, but the environment gave no SFT trajectory")
    return [(ids + eos, m + [True] * len(eos)) for ids, m in rows]


def warm_start(trainer, rows, cfg, dp: tuple[int, int], pad_id: int, log, stop, bar) -> None:
    """``cfg.sft.steps`` cross-entropy steps on ``rows`` (trainer ranks; ``dp`` = (index, size) on
    the trainer mesh), logged on their own ``sft_step`` axis; stops early on a stop request."""
    s = cfg.sft
    for step in range(s.steps):
        if stop.requested(trainer.group):
            break
        trainer.set_lr(lr_at(step, s.steps, s.lr, s.lr_schedule, s.warmup_steps, cfg.train.min_lr_frac))
        idx = step_indices(len(rows), s.batch_size, cfg.run.seed, step, salt=1)
        stats = trainer.sft_step(sft_batch([rows[i] for i in idx[dp[0]:: dp[1]]], pad_id), s.context_weight)
        # SFT rows: their own step axis and key names (its grad norm is sft/grad_norm, not the RL
        # phase's train/grad_norm, so TensorBoard never draws them on one curve)
        log.log(step, {k.replace("train/", "sft/", 1): v for k, v in stats.items()}, step_key="sft_step")
        bar(info=f"loss {stats['sft/loss']:.3f}")
    trainer.set_lr(cfg.train.lr)
    trainer.reset_reference()  # the KL anchor is the warm-started policy, not the random init
