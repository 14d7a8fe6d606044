"""Advantage estimators, DAPO's dynamic-sampling filter and overlong reward shaping.

Sequence-level estimators (GRPO, Dr. GRPO, RLOO) map scalar rewards ``[N]`` to scalar advantages
``[N]``, grouped by ``group_id`` (any int64 ids; trajectories with the same id answer the same
prompt); ``compute_advantages`` broadcasts them over the policy tokens. Token-level estimators
(REINFORCE++, GAE) return ``[N, T]``. Time runs over **policy tokens only** (``loss_mask``):
tool observations and prompt tokens inside a multi-turn trajectory are skipped, not discounted.
Every statistic here is over the batch it is given: compute advantages on the whole step batch
(all ranks' groups together) before it is split into micro-batches or sharded over ranks.
"""

import torch
from tensordict import TensorDict
from torch import Tensor

from sidpt.batch import (
    ADVANTAGES,
    GROUP_ID,
    LOSS_MASK,
    OLD_LOGPROBS,
    REF_LOGPROBS,
    REWARD,
    ROLLOUT_LOGPROBS,
    VALUES,
)
from sidpt.rl.kl import kl_estimate

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae")


def _group_sums(x: Tensor, group_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-trajectory sum of x over its group, group size, and the dense group index."""
    _, inv = torch.unique(group_id, return_inverse=True)  # [N] in 0..G-1
    num_groups = int(inv.max()) + 1 if inv.numel() else 0
    sums = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inv, x)  # [G]
    counts = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inv, torch.ones_like(x))
    return sums[inv], counts[inv], inv


def group_mean_std(reward: Tensor, group_id: Tensor) -> tuple[Tensor, Tensor]:
    """Per-trajectory group mean and unbiased (Bessel) group std of the reward.  # [N], [N]

    A group of one has std 0. The unbiased std matches TRL and verl's ``torch.std``.
    """
    sums, counts, _ = _group_sums(reward, group_id)
    mean = sums / counts  # [N]
    sq_dev, _, _ = _group_sums((reward - mean).square(), group_id)
    std = (sq_dev / (counts - 1).clamp(min=1)).sqrt()  # [N]
    return mean, std


def grpo_advantages(reward: Tensor, group_id: Tensor, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantage: A_i = (r_i - mean_g(r)) / (std_g(r) + eps).  # [N] -> [N]

    Shao et al., "DeepSeekMath", 2024, sec. 4.1.2 (outcome supervision). ``norm_std=False`` is
    Dr. GRPO (Liu et al., "Understanding R1-Zero-Like Training", 2025, eq. 3), which drops the std
    division because it up-weights groups with low reward variance (too easy or too hard).
    std is the unbiased group std (the paper does not say which); groups of one get A = 0.
    """
    mean, std = group_mean_std(reward, group_id)
    adv = reward - mean
    return adv / (std + eps) if norm_std else adv


def dr_grpo_advantages(reward: Tensor, group_id: Tensor) -> Tensor:
    """Dr. GRPO advantage A_i = r_i - mean_g(r) (Liu et al. 2025, eq. 3): GRPO without std.  # [N]"""
    return grpo_advantages(reward, group_id, norm_std=False)


def rloo_advantages(reward: Tensor, group_id: Tensor) -> Tensor:
    """RLOO: A_i = r_i - (1 / (k - 1)) sum_{j != i} r_j over the k samples of i's group.  # [N]

    Kool et al., "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019; Ahmadian et al.,
    "Back to Basics: Revisiting REINFORCE Style Optimization for RLHF", 2024, eq. 6. Equals
    k / (k - 1) * (r_i - mean_g(r)). Departure: a group of one has no leave-one-out baseline and
    gets A = 0 (the papers assume k >= 2).
    """
    sums, counts, _ = _group_sums(reward, group_id)
    baseline = (sums - reward) / (counts - 1).clamp(min=1)  # [N]
    return torch.where(counts > 1, reward - baseline, torch.zeros_like(reward))


def sequence_to_token_reward(reward: Tensor, mask: Tensor) -> Tensor:
    """Place each scalar reward on its trajectory's last policy token.  # [N], [N, T] -> [N, T]"""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)  # [N, T]
    last = torch.where(mask, pos, -1).amax(-1)  # [N], -1 when no policy token
    out = torch.zeros(mask.shape, dtype=reward.dtype, device=reward.device)
    is_last = (pos == last[:, None]) & mask  # [N, T]
    return torch.where(is_last, reward[:, None], out)


def discounted_returns(token_reward: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over policy tokens only; 0 elsewhere.  # [N, T]

    Rewards on non-policy positions are ignored. gamma = 1 is a reverse cumulative sum.
    """
    r = torch.where(mask, token_reward, 0.0)  # [N, T]
    if gamma == 1.0:
        ret = r.flip(-1).cumsum(-1).flip(-1)
        return torch.where(mask, ret, 0.0)
    ret = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [N]
    for t in reversed(range(r.shape[1])):
        running = torch.where(mask[:, t], r[:, t] + gamma * running, running)
        ret[:, t] = running
    return torch.where(mask, ret, 0.0)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked entries (population std); 0 elsewhere.  # [N, T]"""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = ((x - mean).square() * m).sum() / n
    return torch.where(mask, (x - mean) / (var.sqrt() + eps), 0.0)


def reinforce_pp_advantages(
    reward: Tensor,
    mask: Tensor,
    group_id: Tensor | None = None,
    token_reward: Tensor | None = None,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++: batch-normalised returns.  # reward [N], mask [N, T] -> [N, T]

    Hu et al., "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs", 2025:
    token reward r_t = 1[t = last] * R - beta * KL_t (``token_reward`` carries the per-token
    term, e.g. ``-beta * k``), return G_t = sum_{k >= t} gamma^(k - t) r_k, and
    A_t = (G_t - mean(G)) / std(G) with mean and (population) std over **all policy tokens of
    the batch**. With ``group_id`` it is "REINFORCE++-baseline": R is replaced by R - mean_g(R)
    before the returns (the group baseline), and the batch normalisation still follows.
    """
    if group_id is not None:
        mean, _ = group_mean_std(reward, group_id)
        reward = reward - mean
    r = sequence_to_token_reward(reward, mask)  # [N, T]
    if token_reward is not None:
        r = r + torch.where(mask, token_reward, 0.0)
    return masked_whiten(discounted_returns(r, mask, gamma), mask, eps)


def gae_advantages(
    token_reward: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation for a value head.  # [N, T] x3 -> ([N, T], [N, T])

    Schulman et al., "High-Dimensional Continuous Control Using GAE", 2016, eq. 16:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l},
    returns R_t = A_t + V_t (the value-head target). Steps are the policy tokens only: V_{t+1} is
    the value at the next policy token of the trajectory, and 0 after its last one (the episode
    terminates; departure: a trajectory cut by the length limit is not bootstrapped). Rewards on
    non-policy positions are ignored; outputs are 0 there.
    """
    N, T = mask.shape
    adv = torch.zeros_like(values)  # [N, T]
    next_value = torch.zeros_like(values[:, 0])  # [N]
    next_adv = torch.zeros_like(values[:, 0])  # [N]
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = token_reward[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a, 0.0)
        next_adv = torch.where(m, a, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, adv + values, 0.0)
    return adv, returns


def dynamic_sampling_filter(reward: Tensor, group_id: Tensor) -> tuple[Tensor, int]:
    """DAPO dynamic sampling: keep groups whose rewards are not all equal.  # [N] -> [N] bool, int

    Yu et al., "DAPO", 2025, eq. 11 (0 < |{correct}| < G), generalised to any reward: a group whose
    rewards are all equal has zero GRPO/RLOO advantage everywhere and only costs compute.
    Returns the keep mask and the number of dropped groups. DAPO then over-samples to refill the
    batch; that is the data loader's job.
    """
    _, inv = torch.unique(group_id, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    rmax = torch.full((G,), -torch.inf, dtype=reward.dtype, device=reward.device).scatter_reduce(
        0, inv, reward, "amax"
    )
    rmin = torch.full((G,), torch.inf, dtype=reward.dtype, device=reward.device).scatter_reduce(
        0, inv, reward, "amin"
    )
    varied = rmax > rmin  # [G]
    return varied[inv], int((~varied).sum())


def overlong_penalty(response_len: Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, added to the reward.  # [N] -> [N]

    Yu et al., "DAPO", 2025, eq. 13, with L_max = ``max_len`` and L_cache = ``buffer_len``:
    0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache inside the last L_cache
    tokens; -1 beyond L_max; all times ``factor``. ``response_len`` is the number of generated
    tokens (``loss_mask.sum(-1)`` for multi-turn trajectories).
    """
    over = (response_len.to(torch.float64) - (max_len - buffer_len)).clamp(min=0)  # [N]
    return (-(over / buffer_len).clamp(max=1.0) * factor).to(torch.float32)


def kl_token_penalty(batch: TensorDict, kl_coef: float, kind: str = "k1") -> Tensor:
    """-kl_coef * k(pi_old || pi_ref) per policy token, for the KL-in-reward variant.  # [N, T]

    pi_old is OLD_LOGPROBS when the trainer recomputed it, else ROLLOUT_LOGPROBS. See
    ``kl.kl_estimate`` for what each estimator gives in the reward.
    """
    logp = batch.get(OLD_LOGPROBS, None)
    if logp is None:
        logp = batch[ROLLOUT_LOGPROBS]
    k = kl_estimate(logp.float(), batch[REF_LOGPROBS].float(), kind)
    return torch.where(batch[LOSS_MASK], -kl_coef * k, 0.0)


def compute_advantages(
    batch: TensorDict,
    estimator: str = "grpo",
    *,
    norm_std: bool = True,
    gamma: float = 1.0,
    lam: float = 1.0,
    kl_coef: float = 0.0,
    kl_kind: str = "k1",
) -> TensorDict:
    """Return a shallow copy of ``batch`` with ADVANTAGES [N, T] (0 off the policy tokens).

    ``estimator`` is one of ESTIMATORS. With ``kl_coef > 0`` the KL penalty goes into the reward:
    per token for REINFORCE++ and GAE, summed over the trajectory's tokens for the sequence-level
    estimators (GRPO, Dr. GRPO, RLOO). For GAE the value-head targets (returns) are
    ``ADVANTAGES + VALUES`` on the policy tokens; they are not stored.
    """
    mask = batch[LOSS_MASK]
    reward = batch[REWARD].float()
    gid = batch[GROUP_ID]
    tok_pen = kl_token_penalty(batch, kl_coef, kl_kind) if kl_coef > 0 else None  # [N, T]
    if estimator in ("grpo", "dr_grpo", "rloo"):
        if tok_pen is not None:
            reward = reward + tok_pen.sum(-1)
        if estimator == "rloo":
            a = rloo_advantages(reward, gid)
        else:
            a = grpo_advantages(reward, gid, norm_std=norm_std and estimator == "grpo")
        adv = torch.where(mask, a[:, None], 0.0)  # [N, T]
    elif estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        group = gid if estimator == "reinforce_pp_baseline" else None
        adv = reinforce_pp_advantages(reward, mask, group, tok_pen, gamma)
    elif estimator == "gae":
        r = sequence_to_token_reward(reward, mask)
        if tok_pen is not None:
            r = r + tok_pen
        adv, _ = gae_advantages(r, batch[VALUES].float(), mask, gamma, lam)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")
    out = batch.copy()
    out[ADVANTAGES] = adv
    return out


def dynamic_sampling(batch: TensorDict) -> tuple[TensorDict, dict[str, int]]:
    """DAPO on a batch: the groups whose rewards are all equal (``dynamic_sampling_filter``, the one
    rule) lose their loss tokens, so they leave the loss normalisers too; report how many. Rows
    stay (the batch keeps its shape: the lean step then skips them like any zero-advantage row)."""
    keep, dropped = dynamic_sampling_filter(batch[REWARD], batch[GROUP_ID])
    total = int(torch.unique(batch[GROUP_ID]).numel())
    out = batch.copy()
    if LOSS_MASK in batch.keys():
        out[LOSS_MASK] = batch[LOSS_MASK] & keep[:, None]
    return out, {"dapo/groups_dropped": dropped, "dapo/groups_total": total}
