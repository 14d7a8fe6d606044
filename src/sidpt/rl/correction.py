"""Trainer-inference mismatch corrections and their diagnostics.

Three policies meet in a step: the behaviour policy mu (the inference engine that sampled the
tokens, ROLLOUT_LOGPROBS), the proximal policy pi_old (the trainer's recompute of the same
weights, OLD_LOGPROBS) and the current policy pi being optimised. Even with identical weights,
pi_old != mu (different kernels, precisions, batch shapes, MoE routing), so the samples are
off-policy for the trainer. Per token, rho_t = pi_old_t / mu_t = exp(old_logprob - rollout_logprob).

Two forms (``form``):

- ``decoupled`` (three policies): the PPO ratio is pi / pi_old (trust region around the
  trainer's weights) and the IS weight w(rho) corrects pi_old vs mu. Hilton et al., "Batch
  size-invariance for policy optimization", 2022; Yao et al. 2025 (TIS); Liu et al. 2025 (MIS).
- ``bypass`` (pi_old := mu): the PPO ratio is pi / mu, which already is the importance ratio, its
  clip playing the role of the truncation; so the IS weight is 1 and only the rejection masks
  (computed from pi_old vs mu when the trainer recomputed pi_old; none otherwise) apply. For an
  explicitly truncated weight in this form use the ``is_pg`` loss (-sg(min(pi / mu, C)) A log pi).

Modes (``mode``), weights detached, log-ratios clamped to +-LOG_RATIO_CLAMP before exp:

- ``none``:      w = 1.
- ``token-tis``: w_t = min(rho_t, C). Yao et al., "Your Efficient RL Framework Secretly Brings
  You Off-Policy RL Training", 2025 (truncated IS).
- ``token-mis``: w_t = rho_t, token masked if rho_t outside [lo, hi] (default [0, 2]). Liu et al.,
  "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch",
  2025 (masked IS; the paper has an upper bound only; lo generalises it).
- ``seq-tis``:   w_i = min(prod_t rho_t, C) on every token of trajectory i (Liu et al. 2025).
- ``seq-mis``:   w_i = prod_t rho_t, trajectory masked if outside [lo, hi] (Liu et al. 2025).
- ``geo-mis``:   w = 1, trajectory masked if the geometric mean exp(mean_t log rho_t) is outside
  [lo, hi] (a length-normalised sequence rejection; default [0.99, 1.01], our choice: the
  per-token geometric mean stays very close to 1).
- ``icepop``:    w_t = rho_t, token masked if rho_t outside [alpha, beta] = [lo, hi] (default
  [0.5, 5]). Ling team, "Every Step Evolves: Scaling RL for Trillion-Scale Thinking Model"
  (Ring-1T), 2025, IcePop: M(k) = k on [alpha, beta], 0 outside. It is token-MIS with a lower
  bound and its own defaults; the two share code.
- ``k3-rs``:     w = 1, trajectory masked if mean_t (rho_t - 1 - log rho_t) > ``k3_max`` (the k3
  estimate of the per-token KL(mu || pi_old), Schulman 2020).
- ``tr-mask``:   sequence-level trust-region masking on the maximum per-token divergence (the
  2026 line of work that rejects a whole trajectory once any of its tokens leaves the trust
  region, instead of reweighting or dropping that token alone): trajectory masked if
  max_t (rho_t - 1 - log rho_t) > ``tr_max`` (default 0.05, about |log rho| > 0.3), and token-TIS
  weights min(rho_t, C) on the trajectories kept. Our reading of the idea: a token-level mask
  (MIS, IcePop) keeps the rest of a trajectory whose continuation was conditioned on the
  off-policy token; masking the trajectory removes that bias too, and the max (not the mean of
  ``k3-rs``) does not let a long trajectory dilute one bad token.

Masked tokens leave TRAIN_MASK, so they also leave the aggregation's denominators (a weight of 0
kept in the denominator would shrink the step, slime PR 657 / verl PR 3915).
"""

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict
from torch import Tensor

from sidpt.batch import LOSS_MASK, OLD_LOGPROBS, ROLLOUT_LOGPROBS
from sidpt.rl.kl import LOG_RATIO_CLAMP
from sidpt.rl.losses import IS_WEIGHT, PROX_LOGPROBS, TRAIN_MASK, LossNorm, loss_norm, loss_weights

CORRECTION_MODES = ("none", "token-tis", "token-mis", "seq-tis", "seq-mis", "geo-mis", "icepop", "k3-rs", "tr-mask")
REWEIGHT_ONLY = ("none", "token-tis", "seq-tis")  # modes that mask no token: TRAIN_MASK == LOSS_MASK
DEFAULT_BOUNDS = {
    "token-mis": (0.0, 2.0),
    "seq-mis": (0.0, 2.0),
    "geo-mis": (0.99, 1.01),
    "icepop": (0.5, 5.0),
}


@dataclass
class Correction:
    """Output of ``mismatch_correction``; every tensor ``[N, T]`` and detached."""

    weight: Tensor  # float: IS weight for the policy term, 0 off ``mask``
    mask: Tensor  # bool: loss_mask minus the rejected tokens
    truncated: Tensor  # bool: tokens whose weight was truncated at C (TIS modes)
    anchor: Tensor  # float: the log-probs the PPO ratio is taken against (pi_old, or mu in bypass)


def token_log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log rho_t = log pi_old - log mu, 0 off mask, clamped to +-LOG_RATIO_CLAMP.  # [N, T]"""
    return torch.where(mask, old_logprobs - rollout_logprobs, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def seq_log_ratio(log_ratio: Tensor) -> Tensor:
    """log prod_t rho_t = sum_t log rho_t (0 off mask already), clamped.  # [N, T] -> [N]"""
    return log_ratio.sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _in_bounds(ratio: Tensor, lo: float, hi: float) -> Tensor:
    return (ratio >= lo) & (ratio <= hi)


def mismatch_correction(
    rollout_logprobs: Tensor,
    old_logprobs: Tensor | None,
    loss_mask: Tensor,
    mode: str = "none",
    form: str = "decoupled",
    *,
    c: float = 2.0,
    lo: float | None = None,
    hi: float | None = None,
    k3_max: float = 1e-2,
    tr_max: float = 0.05,
) -> Correction:
    """IS weight and rejection mask for the trainer-inference mismatch (see the module doc).

    ``c`` is the TIS cap; ``lo``/``hi`` the bounds of the MIS, geo and IcePop modes (defaults in
    DEFAULT_BOUNDS); ``k3_max`` the k3 rejection threshold. Bounds are inclusive: a ratio equal
    to lo or hi is kept. ``old_logprobs`` may be None only in bypass form (no recompute: nothing
    to compare, so no token is masked).
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown correction mode {mode!r}; expected one of {CORRECTION_MODES}")
    if form not in ("decoupled", "bypass"):
        raise ValueError(f"unknown correction form {form!r}; expected 'decoupled' or 'bypass'")
    if old_logprobs is None and form == "decoupled":
        raise ValueError("the decoupled form needs old_logprobs (the trainer's recompute)")
    dlo, dhi = DEFAULT_BOUNDS.get(mode, (0.0, math.inf))
    lo = dlo if lo is None else lo
    hi = dhi if hi is None else hi

    with torch.no_grad():
        if old_logprobs is None:
            log_rho = torch.zeros(loss_mask.shape, dtype=rollout_logprobs.dtype, device=loss_mask.device)
        else:
            log_rho = token_log_ratio(old_logprobs, rollout_logprobs, loss_mask)  # [N, T]
        rho = log_rho.exp()  # [N, T]
        ones = torch.ones_like(rho)
        weight, keep = ones, loss_mask
        truncated = torch.zeros_like(loss_mask)
        if mode == "token-tis":
            weight, truncated = rho.clamp(max=c), (rho > c) & loss_mask
        elif mode in ("token-mis", "icepop"):
            weight, keep = rho, loss_mask & _in_bounds(rho, lo, hi)
        elif mode in ("seq-tis", "seq-mis"):
            seq_rho = seq_log_ratio(log_rho).exp()[:, None].expand_as(rho)  # [N, T]
            if mode == "seq-tis":
                weight, truncated = seq_rho.clamp(max=c), (seq_rho > c) & loss_mask
            else:
                weight, keep = seq_rho, loss_mask & _in_bounds(seq_rho, lo, hi)
        elif mode == "geo-mis":
            n = loss_mask.sum(-1, keepdim=True).clamp(min=1)  # [N, 1]
            geo = (log_rho.sum(-1, keepdim=True) / n).exp()  # [N, 1]
            keep = loss_mask & _in_bounds(geo, lo, hi)
        elif mode == "k3-rs":
            n = loss_mask.sum(-1, keepdim=True).clamp(min=1)  # [N, 1]
            k3 = torch.where(loss_mask, torch.expm1(log_rho) - log_rho, 0.0)  # [N, T]
            keep = loss_mask & (k3.sum(-1, keepdim=True) / n <= k3_max)
        elif mode == "tr-mask":
            k3 = torch.where(loss_mask, torch.expm1(log_rho) - log_rho, 0.0)  # [N, T]
            keep = loss_mask & (k3.amax(-1, keepdim=True) <= tr_max)
            weight, truncated = rho.clamp(max=c), (rho > c) & keep
        if form == "bypass":
            weight, truncated = ones, torch.zeros_like(loss_mask)
        weight = torch.where(keep, weight, 0.0)
    anchor = rollout_logprobs if form == "bypass" else old_logprobs
    return Correction(weight=weight, mask=keep, truncated=truncated, anchor=anchor)


def apply_correction(
    batch: TensorDict, mode: str = "none", form: str = "decoupled", **bounds
) -> tuple[TensorDict, Correction]:
    """Shallow copy of ``batch`` with IS_WEIGHT, TRAIN_MASK and PROX_LOGPROBS set.

    Call once per step, before ``losses.loss_norm(batch[TRAIN_MASK], ...)``, so the aggregation
    denominators exclude rejected tokens. ``bounds`` go to ``mismatch_correction``.
    """
    corr = mismatch_correction(
        batch[ROLLOUT_LOGPROBS], batch.get(OLD_LOGPROBS, None), batch[LOSS_MASK], mode, form, **bounds
    )
    out = batch.copy()
    out[IS_WEIGHT] = corr.weight
    out[TRAIN_MASK] = corr.mask
    out[PROX_LOGPROBS] = corr.anchor
    return out, corr


def mismatch_metrics(
    rollout_logprobs: Tensor,
    old_logprobs: Tensor,
    loss_mask: Tensor,
    correction: Correction | None = None,
    advantages: Tensor | None = None,
    norm: LossNorm | None = None,
    low_prob: float = 1e-3,
    band: tuple[float, float] = (0.5, 2.0),
) -> dict[str, Tensor]:
    """Mismatch diagnostics for one step: a flat dict of detached 0-dim tensors.

    Over the loss tokens (mask m), with log rho_t = log pi_old - log mu (clamped), rho_i the
    product over trajectory i, tokens sampled from mu:

    - ``abs_log_ratio_mean``/``_max``: mean / max_t |log rho_t|.
    - ``seq_abs_log_ratio_mean``/``_max``: over trajectories with a loss token, |sum_t log rho_t|.
    - ``kl_k1`` = mean(-log rho), ``kl_k3`` = mean(rho - 1 - log rho): estimates of the per-token
      KL(mu || pi_old) (Schulman 2020; here r = pi_old / mu, since the samples come from mu).
    - ``chi2_token`` = mean_t(rho_t^2) - 1, ``chi2_seq`` = mean_i(rho_i^2) - 1: estimates of the
      chi-square divergence chi2(pi_old || mu) = E_mu[rho^2] - 1 (can be slightly negative).
    - ``ess_ratio`` = (sum rho)^2 / (n sum rho^2) over loss tokens; ``ess_weight``, the same for
      the applied weights over the kept tokens (1 when no correction): the eta_ess of DESIGN sec. 6.
    - ``ppl_ratio`` = ppl(pi_old) / ppl(mu) = exp(mean(log mu) - mean(log pi_old)) over all loss
      tokens pooled.
    - ``frac_outside_band``: fraction of loss tokens with rho outside ``band`` = [0.5, 2].
    - with ``correction``: ``frac_tokens_masked`` / ``frac_seqs_masked`` (loss tokens removed;
      trajectories with a loss token but no kept token) and ``frac_tokens_truncated`` /
      ``frac_seqs_truncated`` (weight capped at C; trajectories with any capped token).
    - with ``advantages``: ``low_prob_grad_share``. Per token, the gradient coefficient
      g_t = d loss / d log pi_t = -w_t A_t c_t, with c_t = ``losses.loss_weights(mask, norm)``
      (token-mean over the kept tokens when ``norm`` is None) and w_t the applied weight. This is
      exact at the start of the step (pi = pi_old: every PPO ratio is 1, no clip is active) for
      the decoupled PPO / CISPO / REINFORCE losses; in bypass form the PPO clip may already be
      active and is ignored. The share is sum_{mu_t < low_prob} g_t^2 / sum_t g_t^2. It equals the
      share of the squared policy-gradient norm ||sum_t g_t grad log pi_t||^2 under the
      approximation that the per-token score vectors grad log pi_t are orthogonal and of equal
      norm (no backward pass needed; cross terms and the score norms are ignored).

    All values are local to this rank.
    """
    m = loss_mask
    mf = m.to(torch.float64)
    n_tok = mf.sum().clamp(min=1)
    has_tok = m.any(-1)  # [N]
    n_seq = has_tok.sum().clamp(min=1)
    with torch.no_grad():
        log_rho = token_log_ratio(old_logprobs, rollout_logprobs, m).double()  # [N, T]
        rho = log_rho.exp()
        abs_lr = log_rho.abs()
        seq_lr = seq_log_ratio(log_rho)  # [N]
        seq_rho = seq_lr.exp()

        def tok_mean(x):
            return (torch.where(m, x, 0.0)).sum() / n_tok

        def seq_mean(x):
            return torch.where(has_tok, x, 0.0).sum() / n_seq

        def ess(w, keep):
            w = torch.where(keep, w, 0.0)
            n = keep.sum().clamp(min=1)
            s2 = w.square().sum()
            return torch.where(s2 > 0, w.sum().square() / (n * s2), torch.ones_like(s2))

        lo, hi = band
        out = {
            "mismatch/abs_log_ratio_mean": tok_mean(abs_lr),
            "mismatch/abs_log_ratio_max": abs_lr.max() if abs_lr.numel() else abs_lr.sum(),
            "mismatch/seq_abs_log_ratio_mean": seq_mean(seq_lr.abs()),
            "mismatch/seq_abs_log_ratio_max": torch.where(has_tok, seq_lr.abs(), 0.0).max()
            if seq_lr.numel()
            else seq_lr.sum(),
            "mismatch/kl_k1": tok_mean(-log_rho),
            "mismatch/kl_k3": tok_mean(torch.expm1(log_rho) - log_rho),
            "mismatch/chi2_token": tok_mean(rho.square()) - 1,
            "mismatch/chi2_seq": seq_mean(seq_rho.square()) - 1,
            "mismatch/ess_ratio": ess(rho, m),
            "mismatch/ppl_ratio": tok_mean(-log_rho).exp(),
            "mismatch/frac_outside_band": tok_mean(((rho < lo) | (rho > hi)).double()),
        }
        weight, keep = (correction.weight, correction.mask) if correction is not None else (None, m)
        out["mismatch/ess_weight"] = (
            ess(weight.double(), keep) if weight is not None else torch.ones_like(n_tok)
        )
        if correction is not None:
            removed = m & ~keep
            out["mismatch/frac_tokens_masked"] = tok_mean(removed.double())
            out["mismatch/frac_seqs_masked"] = seq_mean((has_tok & ~keep.any(-1)).double())
            out["mismatch/frac_tokens_truncated"] = tok_mean(correction.truncated.double())
            out["mismatch/frac_seqs_truncated"] = seq_mean((correction.truncated & m).any(-1).double())
        if advantages is not None:
            if norm is None:
                norm = loss_norm(keep, "token-mean")
            coef = loss_weights(keep, norm, torch.float64)  # [N, T]
            w = weight.double() if weight is not None else torch.ones_like(coef)
            g2 = torch.where(keep, w * advantages.double() * coef, 0.0).square()  # [N, T]
            low = rollout_logprobs.double() < math.log(low_prob)
            total = g2.sum()
            share = torch.where(
                total > 0, (g2 * low).sum() / total.clamp(min=1e-300), torch.zeros_like(total)
            )
            out["mismatch/low_prob_grad_share"] = share
    return out
