"""Batched sampling with per-request parameters and counter-based random numbers.

Every row of a batch carries its own temperature, top-k, top-p and seed. The random number that
draws a request's n-th generated token is ``uniform(seed, n)``: a hash of the two, so the draw
does not depend on which other requests share the batch or on the order they arrived in.

What the returned log-probability is (the behaviour policy mu of the RL losses):

- ``temperature > 0``: ``log q(token)`` where ``q`` is the distribution that sampled the token:
  ``softmax(logits / T)``, then, if ``top_k > 0``, restricted to the k most likely tokens, then,
  if ``top_p < 1``, restricted to the smallest prefix (by descending probability) whose mass
  reaches ``top_p``, and renormalised. With ``top_k = 0, top_p = 1`` (the RL setting) this is
  exactly ``log_softmax(logits / T)[token]``, which the trainer reproduces from its own logits.
  With truncation the trainer must apply the same truncation to reproduce it.
- ``temperature = 0`` (greedy): the token is the argmax and its log-probability is reported under
  ``softmax(logits)`` (T = 1), i.e. the model's own distribution, not the degenerate point mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sidpt.model.model import compute_dtype


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    top_p: float = 1.0  # 1: no nucleus truncation
    max_new_tokens: int = 128  # over the whole request, all turns together
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS ids; the stop token is kept in the output
    stop_strings: tuple[str, ...] = ()  # e.g. "</search>": pauses the request for a tool call
    seed: int | None = None  # None: drawn from the engine's seed and the submit order

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A uniform number in (0, 1) per row from int64 ``seed`` and ``counter`` [B] (splitmix64).

    int64 multiplication wraps in torch; right shifts are arithmetic, so each is masked to act
    as a logical shift."""
    x = seed * _GOLDEN + counter * _M2 + _GOLDEN
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    mantissa = (x >> 11) & ((1 << 53) - 1)  # 53 random bits
    return (mantissa.double() + 0.5) / float(1 << 53)


def token_logprob(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tok] per row, float32 (float64 stays): logits [B, V], tok [B] -> [B]."""
    logits = logits.to(compute_dtype(logits.dtype))
    return logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def truncated_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """log q over the vocabulary [B, V] (float32; float64 stays), q as in the module docstring;
    -inf off-support."""
    logits = logits.to(compute_dtype(logits.dtype))
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logp = torch.log_softmax(logits / t[:, None], dim=-1)  # [B, V]
    trunc = (top_k > 0) | (top_p < 1)
    if not bool(trunc.any()):
        return logp
    V = logp.shape[-1]
    sorted_lp, order = logp.sort(dim=-1, descending=True, stable=True)  # [B, V]
    rank = torch.arange(V, device=logp.device)
    keep = rank[None, :] < torch.where(top_k > 0, top_k, V)[:, None]
    probs = sorted_lp.exp()
    mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    keep &= mass_before < top_p[:, None]
    sorted_lp = torch.where(keep, sorted_lp, float("-inf"))
    sorted_lp = sorted_lp - torch.logsumexp(sorted_lp, dim=-1, keepdim=True)
    out = torch.empty_like(logp).scatter_(1, order, sorted_lp)
    return torch.where(trunc[:, None], out, logp)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           u: torch.Tensor, logq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits [B, V]; per-row params [B]; uniforms u [B] in (0, 1).

    Returns tokens [B] int64 and their log-probabilities [B] float32 (see the module docstring).
    Sampling is by inverse CDF over the vocabulary in index order, one uniform per token.
    ``logq`` [B, V]: the sampling distribution given whole (exact numerics: the batch-invariant
    log-softmax at T = 1 without truncation; greedy rows report their argmax under it)."""
    greedy = temperature == 0
    given = logq is not None
    if bool(greedy.all()):  # fast path: argmax and its log-probability under T = 1 (or under logq)
        tok = logits.argmax(-1)
        return tok, (logq.gather(1, tok[:, None]).squeeze(1) if given else token_logprob(logits, tok))
    if not given:
        logq = truncated_logprobs(logits, temperature, top_k, top_p)  # [B, V]
    cdf = logq.exp().double().cumsum(-1)  # [B, V]; float64 so the last entry is 1 to ~1e-15
    target = (u.double() * cdf[:, -1])[:, None]
    drawn = torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    if bool(greedy.any()):
        drawn = torch.where(greedy, logits.argmax(-1), drawn)
        if not given:
            logq = torch.where(greedy[:, None], torch.log_softmax(logits.to(logq.dtype), -1), logq)
    return drawn, logq.gather(1, drawn[:, None]).squeeze(1)
