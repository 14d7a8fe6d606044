"""RL core: advantages, policy losses, loss aggregation, KL estimators, mismatch corrections.

Pure functions over ``[N, T]`` tensors (right-padded, aligned with ``tokens``; ``mask`` marks the
tokens the policy produced) and thin wrappers over TensorDict batches (keys in ``sidpt.batch``).
Each function's docstring gives its formula, the paper it implements and where it departs.

- ``advantages``: ``grpo_advantages`` (``norm_std=False`` is Dr. GRPO), ``rloo_advantages``,
  ``reinforce_pp_advantages`` (with or without group baseline), ``gae_advantages``;
  DAPO's ``dynamic_sampling_filter`` and ``overlong_penalty``; ``compute_advantages(batch, name)``
  writes ADVANTAGES.
- ``losses``: per-token policy losses in ``POLICY_LOSSES`` (``ppo`` with clip-higher and
  dual-clip, ``gspo``, ``gspo_token``, ``cispo``, ``reinforce``, ``is_pg``); aggregation
  (``AGG_MODES``) through global normalisers: ``loss_norm`` -> ``all_reduce_norm`` -> per
  micro-batch ``aggregate``; ``micro_batch_loss`` puts it together.
- ``kl``: ``kl_estimate`` (k1, k2, k3) and ``entropy_from_logits``.
- ``correction``: ``mismatch_correction`` / ``apply_correction`` (``CORRECTION_MODES``: none,
  token/seq TIS, token/seq MIS, geometric-mean rejection, IcePop, k3 rejection; decoupled or
  bypass form) and ``mismatch_metrics``.

One trainer step::

    batch = compute_advantages(batch, "grpo")
    batch, corr = apply_correction(batch, "token-tis", c=2.0)   # IS_WEIGHT, TRAIN_MASK, PROX_LOGPROBS
    stats = mismatch_metrics(batch[ROLLOUT_LOGPROBS], batch[OLD_LOGPROBS], batch[LOSS_MASK], corr,
                             batch[ADVANTAGES])
    norm = all_reduce_norm(loss_norm(batch[TRAIN_MASK], "token-mean"))    # once per step
    for mb in micro_batches(batch):                                      # split along trajectories
        loss, m = micro_batch_loss(policy_logprobs(mb), mb, norm, loss="ppo")
        (loss * dp_world_size).backward()   # sum contributions; the DP reduction averages
"""

from sidpt.rl.advantages import (
    ESTIMATORS,
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    dynamic_sampling,
    dynamic_sampling_filter,
    gae_advantages,
    group_mean_std,
    grpo_advantages,
    kl_token_penalty,
    masked_whiten,
    overlong_penalty,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_to_token_reward,
)
from sidpt.rl.correction import (
    CORRECTION_MODES,
    REWEIGHT_ONLY,
    DEFAULT_BOUNDS,
    Correction,
    apply_correction,
    mismatch_correction,
    mismatch_metrics,
    seq_log_ratio,
    token_log_ratio,
)
from sidpt.rl.kl import KL_KINDS, LOG_RATIO_CLAMP, entropy_from_logits, kl_estimate
from sidpt.rl.losses import (
    AGG_MODES,
    IS_WEIGHT,
    POLICY_LOSSES,
    PROX_LOGPROBS,
    TRAIN_MASK,
    LossNorm,
    aggregate,
    all_reduce_norm,
    cispo_loss,
    gspo_loss,
    gspo_token_loss,
    is_pg_loss,
    loss_norm,
    loss_weights,
    micro_batch_loss,
    ppo_loss,
    reinforce_loss,
)

__all__ = [
    "AGG_MODES",
    "CORRECTION_MODES",
    "REWEIGHT_ONLY",
    "DEFAULT_BOUNDS",
    "ESTIMATORS",
    "IS_WEIGHT",
    "KL_KINDS",
    "LOG_RATIO_CLAMP",
    "POLICY_LOSSES",
    "PROX_LOGPROBS",
    "TRAIN_MASK",
    "Correction",
    "LossNorm",
    "aggregate",
    "all_reduce_norm",
    "apply_correction",
    "cispo_loss",
    "compute_advantages",
    "discounted_returns",
    "dr_grpo_advantages",
    "dynamic_sampling",
    "dynamic_sampling_filter",
    "entropy_from_logits",
    "gae_advantages",
    "group_mean_std",
    "grpo_advantages",
    "gspo_loss",
    "gspo_token_loss",
    "is_pg_loss",
    "kl_estimate",
    "kl_token_penalty",
    "loss_norm",
    "loss_weights",
    "masked_whiten",
    "micro_batch_loss",
    "mismatch_correction",
    "mismatch_metrics",
    "overlong_penalty",
    "ppo_loss",
    "reinforce_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "seq_log_ratio",
    "sequence_to_token_reward",
    "token_log_ratio",
]
