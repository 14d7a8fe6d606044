"""Policy losses, loss aggregation over micro-batches and ranks, and the micro-batch loss.

Every policy loss has the signature ``f(logprobs, old_logprobs, advantages, mask, **kw)`` over
``[N, T]`` tensors and returns the per-token loss ``[N, T]`` (the negated surrogate objective), 0
off ``mask``. ``old_logprobs`` is the anchor of the ratio: pi_old in the decoupled form, the
behaviour log-probs mu in the bypass form (see ``correction.py``).

Aggregation. The trainer computes the normaliser once per step over the whole step batch,
``norm = all_reduce_norm(loss_norm(mask, mode))``, and each micro-batch's loss is its **sum
contribution** ``aggregate(loss, mask, norm)``: sums over its tokens/sequences divided by the
global counts. Summing the micro-batch losses (and their gradients) over micro-batches and ranks
then gives exactly the full-batch aggregate. Averaging per-micro-batch means instead weights
tokens by the size of the micro-batch they landed in (the classic gradient-accumulation bug).
If the data-parallel gradient reduction *averages* over ranks (FSDP2 and DDP do by default),
multiply the loss by the data-parallel world size, or the step is 1/world_size too small.
Micro-batches split the batch along trajectories: a trajectory is never split (the per-sequence
modes and GSPO need all of its tokens).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch import Tensor

from sidpt.batch import ADVANTAGES, LOSS_MASK, OLD_LOGPROBS, REF_LOGPROBS
from sidpt.rl.kl import LOG_RATIO_CLAMP, kl_estimate

# Keys written by ``correction.apply_correction`` and read by ``micro_batch_loss``.
IS_WEIGHT = "is_weight"  # [N, T] f32: detached importance weight (1 where no correction), 0 off mask
TRAIN_MASK = "train_mask"  # [N, T] bool: loss_mask minus the tokens a mismatch correction rejected
PROX_LOGPROBS = "prox_logprobs"  # [N, T] f32: anchor of the PPO ratio (pi_old, or mu in bypass form)

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log(pi / pi_old), 0 off mask (so padding garbage cannot reach exp), clamped.  # [N, T]"""
    return torch.where(mask, logprobs - old_logprobs, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


# --- policy losses ---------------------------------------------------------------------------


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> Tensor:
    """PPO clipped surrogate with clip-higher and optional dual-clip.  # [N, T]

    Schulman et al., "Proximal Policy Optimization Algorithms", 2017, eq. 7, per token:
    loss_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t), r_t = pi / pi_old.
    Asymmetric clip ("clip-higher"): Yu et al., "DAPO", 2025, eq. 10 (eps_low 0.2, eps_high 0.28).
    Dual-clip: Ye et al., "Mastering Complex Control in MOBA Games with Deep RL", 2020, eq. 5: for
    A_t < 0 the objective is max(min(...), c A_t) with c > 1, so loss_t <= -c A_t: a huge ratio
    on a negative-advantage token cannot produce an unbounded loss.
    Departure: log r_t is clamped to +-LOG_RATIO_CLAMP before exp.
    """
    ratio = _log_ratio(logprobs, old_logprobs, mask).exp()  # [N, T]
    surr = torch.minimum(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)
    loss = -surr
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return torch.where(mask, loss, 0.0)


def _seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over each trajectory's masked tokens; 0 for a trajectory with none.  # [N]"""
    n = mask.sum(-1).clamp(min=1)
    return torch.where(mask, x, 0.0).sum(-1) / n


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> Tensor:
    """GSPO: PPO clip on the sequence-level ratio s_i = exp(mean_t log(pi / pi_old)).  # [N, T]

    Zheng et al., "Group Sequence Policy Optimization", 2025, eqs. 5-7:
    loss_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), with the paper's tiny clip
    range (3e-4, 4e-4) as defaults. A_i is the mean of ``advantages`` over the trajectory's
    tokens (equal to its sequence advantage when that is broadcast over tokens). loss_i is
    written on every masked token of trajectory i, so the ``seq-mean-token-mean`` aggregation
    gives the paper's (1/G) sum_i loss_i exactly; other modes weight trajectories by length.
    Departure: the mean log-ratio is clamped to +-LOG_RATIO_CLAMP before exp.
    """
    log_s = _seq_mean(_log_ratio(logprobs, old_logprobs, mask), mask)  # [N]
    s = log_s.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [N]
    adv = _seq_mean(advantages, mask)  # [N]
    loss = -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv)  # [N]
    return torch.where(mask, loss[:, None], 0.0)


def gspo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> Tensor:
    """GSPO-token: s_{i,t} = sg[s_i] * pi_t / sg[pi_t], clipped per token.  # [N, T]

    Zheng et al. 2025, eqs. 13-14: numerically s_{i,t} = s_i, but its gradient is
    s_i grad log pi_t, so per-token advantages A_{i,t} can be used. With A_{i,t} = A_i and the
    ``seq-mean-token-mean`` aggregation its gradient equals GSPO's.
    """
    log_s = _seq_mean(_log_ratio(logprobs, old_logprobs, mask), mask).detach()  # [N]
    s = log_s.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [N]
    lp = torch.where(mask, logprobs, 0.0)
    s_tok = s[:, None] * (lp - lp.detach()).exp()  # [N, T], value s_i, gradient s_i grad log pi_t
    surr = torch.minimum(s_tok * advantages, s_tok.clamp(1 - eps_low, 1 + eps_high) * advantages)
    return torch.where(mask, -surr, 0.0)


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 1.0,
    eps_high: float = 4.0,
) -> Tensor:
    """CISPO: clipped, detached IS weight times log-prob.  # [N, T]

    MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", 2025,
    eqs. 4-5: loss_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_t log pi_t. Unlike PPO no token
    loses its gradient; only the weight is bounded. The paper effectively disables the lower
    bound (eps_low = 1, our default) and tunes eps_high; the default 4.0 is ours, not the paper's.
    """
    ratio = _log_ratio(logprobs, old_logprobs, mask).exp().detach()  # [N, T]
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)
    return torch.where(mask, -weight * advantages * logprobs, 0.0)


def reinforce_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Plain REINFORCE: loss_t = -A_t log pi_t (Williams 1992); ``old_logprobs`` unused.  # [N, T]"""
    return torch.where(mask, -advantages * logprobs, 0.0)


def is_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_c: float | None = None,
) -> Tensor:
    """Importance-weighted policy gradient: loss_t = -sg(w_t) A_t log pi_t.  # [N, T]

    w_t = pi_t / pi_old_t, truncated at ``clip_c`` when given (truncated IS, as in TIS: Yao et al.,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025). With the
    behaviour log-probs mu as ``old_logprobs`` this is the bypass-form off-policy REINFORCE.
    """
    w = _log_ratio(logprobs, old_logprobs, mask).exp().detach()  # [N, T]
    if clip_c is not None:
        w = w.clamp(max=clip_c)
    return torch.where(mask, -w * advantages * logprobs, 0.0)


POLICY_LOSSES = {
    "ppo": ppo_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "cispo": cispo_loss,
    "reinforce": reinforce_loss,
    "is_pg": is_pg_loss,
}


# --- aggregation ---------------------------------------------------------------------------


@dataclass
class LossNorm:
    """Global normalisers of one optimiser step, counted once over the whole step batch.

    ``num_tokens``: loss tokens; ``num_seqs``: trajectories with at least one loss token (a
    trajectory fully rejected by a mismatch correction does not count); ``norm_len``: Dr. GRPO's
    constant for ``seq-mean-token-sum-norm``. Counts add across micro-batches and ranks (``+``).
    """

    mode: str
    num_tokens: float
    num_seqs: float
    norm_len: float = 1.0

    def __add__(self, other: "LossNorm") -> "LossNorm":
        assert self.mode == other.mode and self.norm_len == other.norm_len
        return LossNorm(
            self.mode, self.num_tokens + other.num_tokens, self.num_seqs + other.num_seqs, self.norm_len
        )


def loss_norm(mask: Tensor, mode: str, norm_len: float | None = None) -> LossNorm:
    """Count this rank's loss tokens and trajectories (one host sync per step).

    ``mask`` is the whole local step batch's TRAIN_MASK ``[N, T]`` (all micro-batches), not one
    micro-batch's. Follow with ``all_reduce_norm`` when data-parallel. ``norm_len`` is required for
    ``seq-mean-token-sum-norm`` (use the generation budget, e.g. max new tokens).
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {AGG_MODES}")
    if mode == "seq-mean-token-sum-norm" and norm_len is None:
        raise ValueError("seq-mean-token-sum-norm needs norm_len (e.g. the max response length)")
    counts = torch.stack([mask.sum(), mask.any(-1).sum()]).tolist()
    return LossNorm(mode, float(counts[0]), float(counts[1]), float(norm_len or 1.0))


def all_reduce_norm(norm: LossNorm, group=None, device: torch.device | str | None = None) -> LossNorm:
    """Sum the counts over the ranks of ``group``; identity when torch.distributed is not up."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return norm
    if device is None:
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([norm.num_tokens, norm.num_seqs], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return LossNorm(norm.mode, float(t[0]), float(t[1]), norm.norm_len)


def loss_weights(mask: Tensor, norm: LossNorm, dtype: torch.dtype = torch.float32) -> Tensor:
    """d(aggregate) / d(loss_t): the weight of each token in the aggregate.  # [N, T]

    With m the mask, n_i = sum_t m_{i,t} (local: a trajectory is never split), and the global
    counts of ``norm`` (N_tok tokens, N_seq trajectories, L = norm_len):

    - token-mean:               m / N_tok                      (DAPO, Yu 2025, eq. 12)
    - seq-mean-token-mean:      m / (n_i N_seq)                (GRPO, Shao 2024, eq. 3)
    - seq-mean-token-sum:       m / N_seq
    - seq-mean-token-sum-norm:  m / (L N_seq)                  (Dr. GRPO, Liu 2025, eq. 3 with
      the constant normaliser of its released code; verl divides by the padded length instead)
    """
    m = mask.to(dtype)  # [N, T]
    num_seqs = max(norm.num_seqs, 1.0)
    if norm.mode == "token-mean":
        return m / max(norm.num_tokens, 1.0)
    if norm.mode == "seq-mean-token-mean":
        return m / (m.sum(-1, keepdim=True).clamp(min=1) * num_seqs)
    if norm.mode == "seq-mean-token-sum":
        return m / num_seqs
    if norm.mode == "seq-mean-token-sum-norm":
        return m / (norm.norm_len * num_seqs)
    raise ValueError(f"unknown loss aggregation {norm.mode!r}; expected one of {AGG_MODES}")


def aggregate(loss: Tensor, mask: Tensor, norm: LossNorm) -> Tensor:
    """This micro-batch's sum contribution to the step loss: sum_t loss_t * weight_t.  # 0-dim

    See ``loss_weights`` for the weights; summing over micro-batches and ranks gives the
    full-batch aggregate exactly (up to float rounding).
    """
    return (torch.where(mask, loss, 0.0) * loss_weights(mask, norm, loss.dtype)).sum()


# --- the micro-batch loss -------------------------------------------------------------------


def micro_batch_loss(
    logprobs: Tensor,
    batch: TensorDict,
    norm: LossNorm,
    *,
    loss: str = "ppo",
    loss_kwargs: dict | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = aggregate(w_t * policy_loss_t + kl_coef * k_t - entropy_coef * H_t).  # 0-dim

    ``logprobs`` ``[n, T]`` are the current policy's log-probs of the micro-batch ``batch``'s
    tokens. Reads PROX_LOGPROBS (falls back to OLD_LOGPROBS), ADVANTAGES, TRAIN_MASK (falls back
    to LOSS_MASK), IS_WEIGHT (optional) and REF_LOGPROBS (when ``kl_coef > 0``). The IS weight
    multiplies the policy term only (decoupled PPO, Hilton et al., "Batch size-invariance for
    policy optimization", 2022); the KL-in-loss and entropy terms are not reweighted.
    Metrics are detached sum contributions too: summed over micro-batches and ranks they are the
    step's values (``clip_frac`` is a fraction of all loss tokens).
    """
    mask = batch.get(TRAIN_MASK, None)
    if mask is None:
        mask = batch[LOSS_MASK]
    anchor = batch.get(PROX_LOGPROBS, None)
    if anchor is None:
        anchor = batch[OLD_LOGPROBS]
    adv = batch[ADVANTAGES]
    kw = loss_kwargs or {}
    pg = POLICY_LOSSES[loss](logprobs, anchor, adv, mask, **kw)  # [n, T]
    w = batch.get(IS_WEIGHT, None)
    if w is not None:
        pg = pg * w
    total = pg
    metrics = {"loss/policy": aggregate(pg, mask, norm).detach()}
    if kl_coef > 0:
        # mask the inputs, not only the output: padding log-probs may be -inf (0 * inf = nan in backward)
        lp, ref = torch.where(mask, logprobs, 0.0), torch.where(mask, batch[REF_LOGPROBS], 0.0)
        kl = kl_estimate(lp, ref, kl_kind)  # [n, T], 0 off mask
        total = total + kl_coef * kl
        metrics["loss/kl"] = aggregate(kl, mask, norm).detach()
    if entropy is not None:
        total = total - entropy_coef * entropy
        metrics["loss/entropy"] = aggregate(entropy, mask, norm).detach()
    if loss == "ppo":
        ratio = _log_ratio(logprobs, anchor, mask).exp().detach()
        lo, hi = 1 - kw.get("eps_low", 0.2), 1 + kw.get("eps_high", 0.2)
        clipped = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
        metrics["loss/clip_frac"] = (clipped & mask).sum() / max(norm.num_tokens, 1.0)
    return aggregate(total, mask, norm), metrics
