"""KL estimators to the reference policy, and per-token entropy.

Estimators from J. Schulman, "Approximating KL Divergence" (blog, 2020,
http://joschu.net/blog/kl-approx.html). All tensors are per-token, ``[N, T]``, aligned with
``tokens``; the caller masks them (``losses.aggregate`` or ``torch.where(loss_mask, ...)``).
"""

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # |log ratio| bound applied before exp: exp(20) ~ 5e8 is finite in bf16/fp32

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.  # [N, T]

    With ``log r = log pi_ref(x) - log pi(x)`` and ``x ~ pi`` (Schulman 2020):

    - k1 = -log r                 unbiased, high variance, can be negative;
    - k2 = (log r)^2 / 2          biased (an f-divergence that agrees with KL to second order in
      log r, so the bias is small when pi ~ pi_ref), low variance, >= 0;
    - k3 = (r - 1) - log r        unbiased (E_pi[r] = 1), low variance, >= 0.

    **In the loss** (differentiated through log pi at the sampled tokens, the sampling itself not
    differentiated, i.e. on-policy samples), the expected gradients are:

    - k1: E_pi[grad log pi] = 0. No expected gradient, only noise: use k1 in the reward instead.
    - k2: E_pi[(log pi - log pi_ref) grad log pi] = grad KL(pi || pi_ref), the **reverse-KL**
      gradient, exactly.
    - k3: E_pi[(1 - pi_ref / pi) grad log pi] = -sum_x pi_ref(x) grad log pi(x)
      = grad KL(pi_ref || pi), the **forward-KL** gradient (this is GRPO's in-loss term,
      DeepSeekMath 2024, eq. 4), although its value estimates the reverse KL.

    **In the reward** (detached, ``-beta * k`` added to the token reward, then optimised by the
    policy gradient): k1 and k3 are unbiased for the reverse KL value; with k1 the score-function
    gradient is the reverse-KL gradient (the classic RLHF penalty, Ouyang 2022).

    Departure: for k3, log r is clamped to +-LOG_RATIO_CLAMP before exp (and in the ``- log r``
    term too, so k3 stays >= 0); k1 and k2 are not clamped.
    """
    log_r = ref_logprobs - logprobs  # [N, T]
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    if kind == "k3":
        log_r = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where k3 ~ (log r)^2 / 2
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy H_t = -sum_v p_v log p_v of softmax(logits).  # [N, T, V] -> [N, T]

    For the entropy bonus (``loss -= coef * H``, Mnih 2016 / PPO, Schulman 2017, eq. 9).
    Computed from ``log_softmax`` so it is exact for any logit scale; fp16/bf16 logits are upcast
    to fp32 (fp64 stays fp64). Memory is one extra ``[N, T, V]`` tensor: call it per micro-batch.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    return -(logp.exp() * logp).sum(-1)  # [N, T]
