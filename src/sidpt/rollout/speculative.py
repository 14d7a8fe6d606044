"""Speculative on-policy rollouts: a low-precision draft proposes, the exact policy decides.

Every round, for every active request, the draft (an emulated bf16 / fp16 / fp8 copy of the
policy, ``precision.py``) samples k tokens x_1..x_k from its own distributions q_j; one forward
of the target (the policy in ``numerics = "exact"``, float32) gives p_j at the same k positions
and p_{k+1} after them. Token j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at the
first rejection a token is drawn from max(0, p_j - q_j) renormalised and the round ends; if all k
are accepted, a (k+1)-th token is drawn from p_{k+1}. This is the speculative sampling rule of
Leviathan et al. 2023 / Chen et al. 2023, so every emitted token is distributed exactly as the
target policy, and the behaviour log-prob recorded for it is the target's log p (the exact
numerics' log-softmax): the trainer's recompute equals it bitwise, so the IS weight is 1 by
construction while the draft does most of the sequential work. Greedy requests (temperature 0)
accept while the draft's argmax is the target's and take the target's argmax otherwise.

How it departs from the LLM-serving use: there the point is latency at equal distribution; here
it is to sample with the *exact* policy's distribution and log-probs while drafting cheaply
(mismatch 0 instead of corrected). The implementation recomputes each forward over the whole
sequence (no KV cache; the lab's sequences are <= 32 tokens), one batch of all active requests
per forward; it serves single-turn episodes (no stop strings, no tool calls) at temperature 1 or
0 without top-k/top-p. Random numbers are counter-based per request (``sampling.uniform``), so a
request's tokens do not depend on the batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Hashable, Iterable

import torch

from sidpt.model import numerics
from sidpt.model.model import Transformer
from sidpt.rollout.engine import Output, Request, run_to_completion
from sidpt.rollout.precision import FORMATS, install_activation_rounding, round_weights
from sidpt.rollout.sampling import uniform


@dataclass
class _Req:
    req: Request
    seed: int
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    n_gen: int = 0
    done: str | None = None
    draws: int = field(default=0)  # counter of uniforms taken


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row from unnormalised ``weights`` [B, V] with uniforms ``u`` [B]."""
    drawn = torch.searchsorted(weights.cumsum(-1), (u * weights.sum(-1))[:, None]).squeeze(-1)
    return drawn.clamp_(max=weights.shape[-1] - 1)


class SpeculativeEngine:
    """The Engine interface the controller uses (submit, step, has_work, release, generate,
    update_weights, policy_version, model, device, stats), over a target in exact numerics and a
    draft in ``draft_precision``, proposing ``k`` tokens a round."""

    def __init__(self, model: Transformer, k: int, draft_precision: str, max_model_len: int, seed: int = 0):
        if model.numerics != "exact":
            raise ValueError("speculative rollouts verify with the exact policy: give a model in numerics='exact'")
        fmt = draft_precision.removeprefix("emulated-")
        if fmt not in FORMATS:
            raise ValueError(f"draft precision {draft_precision!r}: emulated-{{{', '.join(FORMATS)}}}")
        if k < 1:
            raise ValueError(f"k={k}: draft at least one token a round")
        self.model, self.k, self.fmt, self.max_model_len = model.eval(), k, fmt, max_model_len
        self.draft = copy.deepcopy(model).set_numerics("default").eval()
        round_weights(self.draft, fmt)
        install_activation_rounding(self.draft, fmt)
        self.device = next(model.parameters()).device
        self.policy_version = 0
        self.reqs: dict[Hashable, _Req] = {}
        self._seed_gen = torch.Generator().manual_seed(seed)
        self.stats = {"rounds": 0, "request_rounds": 0, "drafted": 0, "accepted": 0, "emitted": 0,
                      "target_forwards": 0, "draft_forwards": 0}

    def submit(self, req: Request) -> None:
        p = req.params
        if req.id in self.reqs:
            raise ValueError(f"request id {req.id!r} is already in the engine")
        if p.stop_strings:
            raise ValueError(f"request {req.id!r}: speculative rollouts serve single-turn episodes (no stop strings)")
        if p.temperature not in (0.0, 1.0) or p.top_k or p.top_p < 1:
            raise ValueError(f"request {req.id!r}: speculative rollouts sample at temperature 1 (or 0) untruncated")
        if not req.prompt or len(req.prompt) >= self.max_model_len:
            raise ValueError(f"request {req.id!r}: prompt of {len(req.prompt)} tokens (max_model_len "
                             f"{self.max_model_len})")
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))
        self.reqs[req.id] = _Req(req, seed, list(req.prompt), [0.0] * len(req.prompt), [-1] * len(req.prompt))

    def has_work(self) -> bool:
        return any(r.done is None for r in self.reqs.values())

    def release(self, rid: Hashable) -> None:
        self.reqs.pop(rid, None)

    def max_observation(self, rid: Hashable) -> int:
        return -1  # no tool calls

    def resume(self, rid: Hashable, observation: list[int]) -> None:
        raise ValueError("speculative rollouts serve single-turn episodes: no resume")

    def generate(self, requests: Iterable[Request]) -> list[Output]:
        return run_to_completion(self, requests)

    @torch.no_grad()
    def update_weights(self, buckets, version: int | None = None) -> int:
        params, draft = dict(self.model.named_parameters()), dict(self.draft.named_parameters())
        for bucket in buckets:
            for name, t in bucket.items():
                if name not in params:
                    raise KeyError(f"update_weights: unknown parameter {name!r}")
                params[name].copy_(t)
                draft[name].copy_(t)
        round_weights(self.draft, self.fmt)
        self.policy_version = self.policy_version + 1 if version is None else version
        return self.policy_version

    def _uniform(self, rows: list[_Req]) -> torch.Tensor:
        u = uniform(torch.tensor([r.seed for r in rows]), torch.tensor([r.draws for r in rows]))
        for r in rows:
            r.draws += 1
        return u

    @staticmethod
    def _padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(map(len, seqs))
        tok = torch.zeros(len(seqs), T, dtype=torch.int64, device=device)
        for i, s in enumerate(seqs):
            tok[i, : len(s)] = torch.tensor(s, device=device)
        return tok, torch.tensor([len(s) for s in seqs], device=device)

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """One round over every active request: draft k, verify once, emit 1..k+1 tokens each."""
        rows = [r for r in self.reqs.values() if r.done is None]
        if not rows:
            return []
        B, k = len(rows), self.k
        greedy = torch.tensor([r.req.params.temperature == 0 for r in rows])
        seqs = [list(r.tokens) for r in rows]
        drafts, q_all = [], []
        for _ in range(k):  # the draft's k tokens, sampled from its own q
            tok, lens = self._padded(seqs, self.device)
            logits = self.draft(tok)[torch.arange(B), lens - 1].float()  # [B, V]
            q = torch.softmax(logits, -1)
            u = self._uniform(rows).to(q.dtype)
            x = torch.where(greedy, logits.argmax(-1), _draw(q, u))
            drafts.append(x)
            q_all.append(q)
            for s, t in zip(seqs, x.tolist()):
                s.append(t)
        self.stats["draft_forwards"] += k
        tok, lens = self._padded(seqs, self.device)
        pos = (lens - k - 1)[:, None] + torch.arange(k + 1, device=self.device)[None]  # [B, k+1]
        logits = self.model(tok, select=(torch.arange(B, device=self.device)[:, None] * tok.shape[1] + pos).reshape(-1))
        logp = numerics.log_softmax(logits).view(B, k + 1, -1)  # [B, k+1, V], the trainer's exact log-softmax
        self.stats["target_forwards"] += 1
        x = torch.stack(drafts, 1)  # [B, k]
        q = torch.stack(q_all, 1)  # [B, k, V]
        p = logp.exp()
        px, qx = p[:, :k].gather(2, x[..., None])[..., 0], q.gather(2, x[..., None])[..., 0]  # [B, k]
        u_acc = torch.stack([self._uniform(rows) for _ in range(k)], 1).to(p.dtype)  # [B, k]
        ok = torch.where(greedy[:, None], x == logp[:, :k].argmax(-1), u_acc * qx < px)  # u < p / q
        n_acc = torch.where(ok.all(1), k, (~ok).int().argmax(1))  # accepted drafts per row
        # the correction token: from max(0, p - q) at the first rejection, from p after k accepted
        j = n_acc.clamp(max=k - 1)
        resid = (p[torch.arange(B), j] - q[torch.arange(B), j]).clamp(min=0)
        dist = torch.where((n_acc == k)[:, None], p[:, k], resid)
        dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p[torch.arange(B), j])  # p == q: resample p
        u = self._uniform(rows).to(p.dtype)
        extra = _draw(dist, u)
        at = torch.where(n_acc == k, k, n_acc)
        extra = torch.where(greedy, logp[torch.arange(B), at].argmax(-1), extra)
        self.stats["rounds"] += 1
        self.stats["request_rounds"] += B
        self.stats["drafted"] += B * k
        self.stats["accepted"] += int(n_acc.sum())
        outs = []
        for i, r in enumerate(rows):
            a = int(n_acc[i])
            new = x[i, :a].tolist() + [int(extra[i])]
            lps = logp[i, torch.arange(a + 1), torch.tensor(new)].tolist()
            for t, lp in zip(new, lps):
                r.tokens.append(t)
                r.logprobs.append(lp)
                r.versions.append(self.policy_version)
                r.n_gen += 1
                self.stats["emitted"] += 1
                if t in r.req.params.stop_token_ids:
                    r.done = "stop"
                elif r.n_gen >= r.req.params.max_new_tokens or len(r.tokens) >= self.max_model_len:
                    r.done = "length"
                if r.done:
                    break
            if r.done:
                P = len(r.req.prompt)
                outs.append(Output(r.req.id, r.tokens, P, r.logprobs, [False] * P + [True] * r.n_gen, r.versions,
                                   r.done))
                del self.reqs[r.req.id]
        return outs
