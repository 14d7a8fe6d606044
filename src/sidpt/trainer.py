"""The trainer role: FSDP2 policy, log-prob recompute, RL and SFT updates, full-weight buckets.

The policy is sharded with ``fully_shard`` over the trainer mesh (per block, then the root); a
single process trains the plain module. Every collective here runs on the trainer mesh's group. Every update splits the local batch into micro-batches
under a token budget (along trajectories, padding trimmed per micro-batch) and sums their loss
contributions, which ``sidpt.rl.losses`` normalises by global counts, so the step does not depend
on the micro-batch split or the number of ranks. FSDP2 averages gradients over the mesh, so the
summed loss is scaled by the data-parallel size. All ranks run the same number of micro-batches
(collectives inside forward/backward); a rank with fewer runs empty ones.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from sidpt.batch import ADVANTAGES, GROUP_ID, LOSS_MASK, OLD_LOGPROBS, PROMPT_LEN, REF_LOGPROBS, SEQ_LEN, TOKENS
from sidpt.dist.transfer import bucket_names
from sidpt.dist.world import all_reduce_max, all_reduce_sum
from sidpt.model.model import Transformer, token_logprobs
from sidpt.logprobs import head_logprobs
from sidpt.packing import packed_logprobs
from sidpt.rl import TRAIN_MASK, Correction, LossNorm, all_reduce_norm, entropy_from_logits, loss_norm, micro_batch_loss


@dataclass
class OptimConfig:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    micro_batch_tokens: int
    pack: bool = False  # RL forwards through sidpt.packing (no padding, each group's prompt once)
    fused: bool = False  # the LM head and log-probs through kernels/linear_logprob.py (no [M, V] logits)


def sequence_logprobs(model, tokens: torch.Tensor, entropy: bool = False, mask: torch.Tensor | None = None,
                      fused: bool = False):
    """lp [n, T] with lp[:, t] = log p(tokens[:, t] | tokens[:, :t]) (0 at t = 0), float32; and the
    entropy [n, T] of the same next-token distributions when asked. With ``mask`` [n, T] only the
    masked positions are computed (the others are 0) and the LM head runs on those rows only
    (``fused``: through the fused log-prob kernel, ``head_logprobs``).
    A model in exact numerics (``set_numerics``) takes the engine's batch-invariant log-softmax."""
    exact = getattr(model, "numerics", "default") == "exact"
    if mask is None:
        logits = model(tokens)[:, :-1]  # [n, T-1, V]
        lp = F.pad(token_logprobs(logits, tokens[:, 1:], exact), (1, 0))  # [n, T]
        ent = F.pad(entropy_from_logits(logits), (1, 0)) if entropy else None
        return lp, ent
    target = mask.clone()
    target[:, 0] = False
    source = F.pad(target[:, 1:], (0, 1))  # the hidden state at t-1 predicts token t
    picked, ents = head_logprobs(model, tokens[target], entropy, fused, tokens=tokens, select=source)  # [M] each
    lp = torch.zeros(tokens.shape, dtype=picked.dtype, device=tokens.device).masked_scatter(target, picked)
    ent = None if ents is None else torch.zeros_like(lp).masked_scatter(target, ents)
    return lp, ent


def micro_batches(batch: TensorDict, max_tokens: int) -> list[TensorDict]:
    """Consecutive trajectories whose padded size (rows x longest) stays under ``max_tokens``;
    each micro-batch is trimmed to its own longest trajectory."""
    def trim(td: TensorDict, T: int) -> TensorDict:  # per-token tensors [n, T_full] -> [n, T]
        return td.apply(lambda x: x[:, :T] if x.dim() >= 2 else x)

    lens = batch[SEQ_LEN].tolist()
    out, start, longest = [], 0, 0
    for i, n in enumerate(lens):
        if i > start and max(longest, n) * (i - start + 1) > max_tokens:
            out.append(trim(batch[start:i], longest))
            start, longest = i, 0
        longest = max(longest, n)
    out.append(trim(batch[start:], longest))
    return out


def loss_free(td: TensorDict) -> TensorDict:
    """A copy of ``td`` with no loss token: it runs the forward and backward (FSDP collectives)
    and contributes exactly 0."""
    empty = td.clone()
    empty[LOSS_MASK] = torch.zeros_like(empty[LOSS_MASK])
    if TRAIN_MASK in empty.keys():
        empty[TRAIN_MASK] = torch.zeros_like(empty[TRAIN_MASK])
    return empty


def signal_rows(batch: TensorDict, mask_key: str = TRAIN_MASK) -> torch.Tensor:
    """[N] bool: trajectories whose advantage is nonzero on some ``mask_key`` token. Every policy
    loss is linear in the advantage, so the others (GRPO groups with equal rewards) have an
    exactly-zero policy gradient; without a KL or entropy term they can skip the forward and
    backward."""
    return ((batch[ADVANTAGES] != 0) & batch[mask_key]).any(-1)


class Trainer:
    def __init__(self, model: Transformer, optim: OptimConfig, mesh=None, reference: bool = False):
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
        self.dp = mesh.size() if mesh is not None else 1
        self.group = mesh.get_group("dp") if mesh is not None else None  # the trainer mesh's group
        if mesh is not None and self.dp > 1:
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.model = model
        self.cfg = optim
        self.device = next(model.parameters()).device
        self.opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                     weight_decay=optim.weight_decay, eps=1e-8)
        self.minibatch_stats: list[dict[str, float]] = []  # the last rl_step's, one per optimizer step
        self.forward_tokens = 0  # tokens the policy step's forwards ran on (packed or padded)
        self.tokens_run = 0  # tokens every forward so far ran on (recompute, reference, policy steps)

    def _logprobs(self, model, mb: TensorDict, mask: torch.Tensor, entropy: bool = False):
        """``sequence_logprobs`` of a micro-batch, packed (``OptimConfig.pack``) when it carries its
        prompt lengths and group ids: the same values to float rounding, less work. Counts the
        tokens the forward ran on (``forward_tokens``: packed or padded), for utilisation figures."""
        if self.cfg.pack and PROMPT_LEN in mb.keys() and GROUP_ID in mb.keys():
            lp, ent, n = packed_logprobs(model, mb[TOKENS], mb[SEQ_LEN], mb[PROMPT_LEN], mb[GROUP_ID], mask, entropy,
                                         fused=self.cfg.fused)
        else:
            (lp, ent), n = (sequence_logprobs(model, mb[TOKENS], entropy=entropy, mask=mask, fused=self.cfg.fused),
                            mb[TOKENS].numel())
        self.forward_tokens += n
        self.tokens_run += n
        return lp, ent

    def _aligned(self, mbs: list[TensorDict]) -> list[TensorDict]:
        """Pad the micro-batch list with loss-free copies so every rank runs the same count."""
        n = int(all_reduce_max([len(mbs)], self.device, self.group)[0])
        return mbs + [loss_free(mbs[0][:1]) for _ in range(n - len(mbs))]

    @torch.no_grad()
    def recompute(self, batch: TensorDict, rows: torch.Tensor | None = None, policy: bool = True) -> TensorDict:
        """OLD_LOGPROBS (and REF_LOGPROBS with a reference model) for every loss token of ``batch``,
        or only of the ``rows`` [N] bool (the others get 0: rows the lean step will not train).
        ``policy=False``: REF_LOGPROBS only (``fused_step`` takes pi_old from its own forward)."""
        if rows is not None:
            part = self.recompute(_rows(batch, rows), policy=policy)
            out = batch.copy()
            for key in (OLD_LOGPROBS, REF_LOGPROBS):
                if key in part.keys():
                    full = torch.zeros(batch[TOKENS].shape, dtype=part[key].dtype, device=part[key].device)
                    if bool(rows.any()):
                        full[rows] = part[key]
                    out[key] = full
            return out
        T = batch[TOKENS].shape[1]
        olds, refs = [], []
        for mb in self._aligned(micro_batches(batch, self.cfg.micro_batch_tokens)):
            if policy:
                lp, _ = self._logprobs(self.model, mb, mb[LOSS_MASK])
                olds.append(F.pad(lp, (0, T - lp.shape[1])))
            if self.reference is not None:
                rlp, _ = self._logprobs(self.reference, mb, mb[LOSS_MASK])
                refs.append(F.pad(rlp, (0, T - rlp.shape[1])))
        n = batch.batch_size[0]
        out = batch.copy()
        if olds:
            out[OLD_LOGPROBS] = torch.cat(olds)[:n]
        if refs:
            out[REF_LOGPROBS] = torch.cat(refs)[:n]
        return out

    def rl_step(self, batch: TensorDict, *, agg: str, loss: str, loss_kwargs: dict, kl_coef: float,
                entropy_coef: float, norm_len: float | None = None, keep: torch.Tensor | None = None,
                mini_batches: int = 1, epochs: int = 1) -> dict[str, float]:
        """``epochs`` passes over the local batch, each split into ``mini_batches`` consecutive row
        chunks with one optimizer step each (PPO's mini-batches: verl's ``ppo_mini_batch_size`` /
        ``ppo_epochs``, TRL's ``num_iterations``); every rank takes part in every step.

        From the second optimizer step on, pi differs from pi_old (OLD_LOGPROBS stays the recompute
        before the first), so ratios leave 1 and the clip acts; ``self.minibatch_stats`` keeps each
        step's loss, clip fraction and grad norm. Each step's loss normalisers count its whole
        chunk's TRAIN_MASK over all ranks. With ``keep`` [N] bool (the lean step, ``signal_rows``)
        only the kept rows run forward and backward: the others have an exactly-zero gradient and
        stay in the normalisers, so the update is the same. 1 mini-batch, 1 epoch: the plain step."""
        if batch.batch_size[0] == 0:
            raise ValueError("rl_step: an empty batch (a rank with nothing to train passes loss_free(rows[:1]))")
        N = batch.batch_size[0]
        bounds = [round(i * N / mini_batches) for i in range(mini_batches + 1)]
        self.minibatch_stats = []
        for _ in range(epochs):
            for lo, hi in zip(bounds, bounds[1:]):
                chunk = batch[lo:hi] if hi > lo else loss_free(batch[:1])
                rows = chunk if keep is None or hi == lo else _rows(chunk, keep[lo:hi])
                self.minibatch_stats.append(self._policy_step(rows, chunk[TRAIN_MASK], agg, loss, loss_kwargs,
                                                              kl_coef, entropy_coef, norm_len, keep is not None))
        stats = dict(self.minibatch_stats[-1]) if len(self.minibatch_stats) == 1 else _mean_stats(self.minibatch_stats)
        stats["train/optimizer_steps"] = len(self.minibatch_stats)
        return stats

    def fused_step(self, batch: TensorDict, correct: Callable[[TensorDict], tuple[TensorDict, Correction]], *,
                   agg: str, loss: str, loss_kwargs: dict, kl_coef: float, entropy_coef: float,
                   norm_len: float | None = None, keep: torch.Tensor | None = None
                   ) -> tuple[dict[str, float], TensorDict, Correction]:
        """``rl_step`` with one mini-batch and one epoch, without the recompute: before a batch's
        only optimizer step pi_old is pi, so OLD_LOGPROBS are the training forward's own log-probs,
        detached (TRL takes them the same way when ``num_iterations = 1``). ``correct`` (e.g.
        ``apply_correction`` with the run's mode) runs per micro-batch on them; a correction that
        rejects tokens changes the loss normalisers after the gradients exist, so the gradients (and
        loss sums) are rescaled by provisional / final count, which is exact: the normalisers enter
        every aggregation as one global factor (``losses.loss_weights``). With ``keep`` (the lean
        step) the correction must only reweight: the rows not kept are never forwarded, so their
        rejections could not be known. Returns the stats, ``batch`` with OLD_LOGPROBS (0 on rows not
        kept) and the Correction of every row (identity on rows not kept)."""
        if batch.batch_size[0] == 0:
            raise ValueError("fused_step: an empty batch (a rank with nothing to train passes loss_free(rows[:1]))")
        rows = batch if keep is None else _rows(batch, keep)
        stats, (old, corr) = self._policy_step(rows, batch[LOSS_MASK], agg, loss, loss_kwargs, kl_coef,
                                               entropy_coef, norm_len, keep is not None, correct)
        stats["train/optimizer_steps"] = 1
        mask = batch[LOSS_MASK]
        full_old = torch.zeros(mask.shape, dtype=old.dtype, device=old.device)
        full = Correction(mask.to(old.dtype), mask.clone(), torch.zeros_like(mask), torch.zeros_like(full_old))
        if keep is None or bool(keep.any()):  # scatter the trained rows back (identity elsewhere)
            sel = slice(None) if keep is None else keep
            full_old[sel] = old
            for f in ("weight", "mask", "truncated", "anchor"):
                getattr(full, f)[sel] = getattr(corr, f)
        out = batch.copy()
        out[OLD_LOGPROBS] = full_old
        return stats, out, full

    def _policy_step(self, batch: TensorDict, norm_mask: torch.Tensor, agg: str, loss: str, loss_kwargs: dict,
                     kl_coef: float, entropy_coef: float, norm_len: float | None, partial: bool,
                     correct: Callable | None = None):
        """One optimizer step of the policy loss over ``batch``, normalised by ``norm_mask``'s counts
        over all trainer ranks (``partial``: ``batch`` holds only part of those rows). With
        ``correct`` (``fused_step``): pi_old from each micro-batch's own forward, the correction
        applied to it, ``norm_mask`` the provisional LOSS_MASK; also returns (OLD_LOGPROBS,
        Correction) of ``batch``'s rows, each [n, T]."""
        norm = all_reduce_norm(loss_norm(norm_mask, agg, norm_len), group=self.group, device=self.device)
        real = micro_batches(batch, self.cfg.micro_batch_tokens)
        self.forward_tokens = 0
        mbs = self._aligned(real)
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        kept: list[tuple[torch.Tensor, Correction]] = []  # fused: each real micro-batch's pi_old and correction
        for i, mb in enumerate(mbs):
            mask = mb[LOSS_MASK] if correct is not None else mb[TRAIN_MASK] | mb[LOSS_MASK]
            lp, ent = self._logprobs(self.model, mb, mask, entropy=True)  # [n, T] each
            if correct is not None:
                mb = mb.copy()
                mb[OLD_LOGPROBS] = torch.where(mb[LOSS_MASK], lp.detach(), 0.0)
                mb, corr = correct(mb)
                if i < len(real):
                    kept.append((mb[OLD_LOGPROBS], corr))
            total, m = micro_batch_loss(lp, mb, norm, loss=loss, loss_kwargs=loss_kwargs, kl_coef=kl_coef,
                                        entropy=ent if entropy_coef > 0 else ent.detach(),
                                        entropy_coef=entropy_coef)
            (total * self.dp).backward()
            m["loss/total"] = total.detach()
            m["train/entropy_sum"] = torch.where(mb[TRAIN_MASK], ent.detach(), 0.0).sum()
            m["train/seqs"] = mb[TRAIN_MASK].any(-1).sum()  # trajectories with a loss token
            m["train/entropy_tokens"] = mb[TRAIN_MASK].sum()
            m["train/seq_tokens"] = mb[SEQ_LEN][mb[TRAIN_MASK].any(-1)].sum()  # real tokens of trained rows
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        fused = None
        if correct is not None:
            T = batch[TOKENS].shape[1]
            pad = lambda x: F.pad(x, (0, T - x.shape[1]))  # noqa: E731  micro-batches are trimmed
            fused = (torch.cat([pad(o) for o, _ in kept]),
                     Correction(*(torch.cat([pad(getattr(c, f)) for _, c in kept])
                                  for f in ("weight", "mask", "truncated", "anchor"))))
            norm = self._renormalise(norm, fused[1].mask, batch[LOSS_MASK], agg, norm_len, partial, sums)
        if partial:  # an aggregate over part of the batch's tokens: not a mean of anything
            sums.pop("loss/entropy", None)
        sums["train/forward_tokens"] = float(self.forward_tokens)  # what the forwards ran on: packed or padded
        stats = self._optimizer_step()
        keys = sorted(sums)
        stats.update(zip(keys, all_reduce_sum([sums[k] for k in keys], self.device, self.group)))
        stats["train/tokens"] = norm.num_tokens
        stats["train/micro_batches"] = len(mbs)
        n_tok = stats.pop("train/entropy_tokens")
        stats["train/entropy"] = stats.pop("train/entropy_sum") / max(n_tok, 1.0)  # token mean, trained tokens
        return stats if correct is None else (stats, fused)

    def _renormalise(self, norm: LossNorm, train_mask: torch.Tensor, loss_mask: torch.Tensor, agg: str,
                     norm_len: float | None, partial: bool, sums: dict[str, float]) -> LossNorm:
        """Fused step: the loss was normalised by the LOSS_MASK counts; the correction's rejections
        (TRAIN_MASK) give the true ones. Scale the gradients and the loss sums by provisional /
        true (the token count for token-mean, the trajectory count otherwise; clip_frac is a
        fraction of tokens). Returns the true counts."""
        rejected = bool((train_mask != loss_mask).any())
        if partial and rejected:
            raise ValueError("fused_step with keep: the correction rejected tokens (a lean step needs a correction "
                             "that only reweights, sidpt.rl.REWEIGHT_ONLY)")
        if not bool(all_reduce_max([float(rejected)], self.device, self.group)[0]):
            return norm
        true = all_reduce_norm(loss_norm(train_mask, agg, norm_len), group=self.group, device=self.device)
        by_tok = max(norm.num_tokens, 1.0) / max(true.num_tokens, 1.0)
        by_seq = max(norm.num_seqs, 1.0) / max(true.num_seqs, 1.0)
        f = by_tok if agg == "token-mean" else by_seq
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(f)
        for k in sums:
            if k.startswith("loss/"):
                sums[k] *= by_tok if k == "loss/clip_frac" else f
        return true

    def sft_step(self, batch: TensorDict, context_weight: float = 0.0) -> dict[str, float]:
        """Cross-entropy on the LOSS_MASK tokens, plus ``context_weight`` times the cross-entropy on
        the other real tokens (prompt, observations), normalised by the summed weights over all
        ranks. A context weight > 0 is language-model pre-training on the documents the policy reads;
        it teaches a random-init model to copy names (they repeat inside each document)."""

        def weights(mb: TensorDict) -> torch.Tensor:  # [n, T]
            T = mb[TOKENS].shape[1]
            real = torch.arange(T, device=mb[TOKENS].device)[None, :] < mb[SEQ_LEN][:, None]
            real[:, 0] = False  # token 0 has no prediction
            return torch.where(mb[LOSS_MASK], 1.0, context_weight * real.float())

        total_w = all_reduce_sum([float(weights(batch).sum())], self.device, self.group)[0]
        mbs = self._aligned(micro_batches(batch, self.cfg.micro_batch_tokens))
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            w = weights(mb)
            lp, _ = sequence_logprobs(self.model, mb[TOKENS], mask=w > 0)
            loss = -(w * lp).sum() / max(total_w, 1.0)
            (loss * self.dp).backward()
            total += float(loss.detach())
        stats = self._optimizer_step()
        stats["sft/loss"] = all_reduce_sum([total], self.device, self.group)[0]
        return stats

    def _optimizer_step(self) -> dict[str, float]:
        """Clip and step; a non-finite gradient norm (a NaN or inf loss or gradient anywhere, on any
        trainer rank: the norm is global) skips the update, leaving weights and AdamW state as
        they were, and is counted (``train/skipped_nonfinite``)."""
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if isinstance(gn, DTensor):
            gn = gn.full_tensor()
        finite = bool(torch.isfinite(gn))
        if finite:
            self.opt.step()
        else:
            self.opt.zero_grad(set_to_none=True)
        return {"train/grad_norm": float(gn), "train/skipped_nonfinite": float(not finite)}

    @torch.no_grad()
    def reset_reference(self) -> None:
        """Make the frozen reference the policy as it is now (e.g. after an SFT warm-start: the KL
        anchor of RL is the policy RL starts from, not the weights the trainer was built with).
        Collective on the trainer mesh, like ``full_weights``."""
        if self.reference is None:
            return
        ref = dict(self.reference.named_parameters())
        for bucket in self.full_weights():
            for name, t in bucket.items():
                ref[name].copy_(t)

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    @torch.no_grad()
    def full_weights(self, bucket_mb: float = 64.0) -> Iterator[dict[str, torch.Tensor]]:
        """Full (unsharded) parameters in buckets of about ``bucket_mb`` (``bucket_names``' rule);
        collective on the trainer mesh (every trainer rank must iterate to the end)."""
        params = dict(self.model.named_parameters())
        for names in bucket_names(((n, p.numel() * p.element_size()) for n, p in params.items()), bucket_mb):
            yield {n: params[n].full_tensor() if isinstance(params[n], DTensor) else params[n].detach() for n in names}


def _rows(batch: TensorDict, keep: torch.Tensor) -> TensorDict:
    """``batch[keep]``, or one loss-free row when nothing is kept (the collectives in the trainer's
    forward and backward need every rank to run)."""
    return batch[keep] if bool(keep.any()) else loss_free(batch[:1])


def _mean_stats(steps: list[dict[str, float]]) -> dict[str, float]:
    """Per-step statistics of several optimizer steps: the mean of each (grad norm, losses, clip
    fraction), the first and last step's clip fraction, the sums of counts."""
    out = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
    for k in ("train/seqs", "train/tokens", "train/micro_batches", "train/forward_tokens", "train/seq_tokens"):
        out[k] = sum(s[k] for s in steps)
    if "loss/clip_frac" in steps[0]:
        out["loss/clip_frac_first"], out["loss/clip_frac_last"] = steps[0]["loss/clip_frac"], steps[-1]["loss/clip_frac"]
    return out


def lr_at(step: int, total: int, lr: float, schedule: str = "constant", warmup: int = 0,
          min_frac: float = 0.1) -> float:
    """Learning rate of step ``step`` (0-based) of ``total``: linear warmup over the first
    ``warmup`` steps (step i: lr * (i + 1) / (warmup + 1)), then constant or a half cosine from lr
    down to ``min_frac * lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule == "constant" or total - warmup <= 1:
        return lr
    t = (step - warmup) / (total - warmup - 1)  # 0 at the first step after warmup, 1 at the last
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))
