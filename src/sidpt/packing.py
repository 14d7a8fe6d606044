"""The trainer's packed forward: a micro-batch in one row with no padding, each group's prompt once.

A GRPO group's trajectories start with the same prompt, and a right-padded batch computes that
prompt once per trajectory and every row to the longest one. ``packed_logprobs`` lays a
micro-batch out as one flat sequence instead: for each *unit* (a run of consecutive rows with the
same GROUP_ID and the same first PROMPT_LEN tokens; a row that shares with no other is a unit of
its own) the prompt once, then each row's remainder (the tokens after its prompt):

    flat:  [prompt_a | rest_a1 | rest_a2 | ... | prompt_b | rest_b1 | ...]      positions restart
           0..P_a-1   P_a..      P_a..          0..P_b-1   P_b..                  per trajectory

Attention per layer is two dense SDPA calls over index-gathered views of the flat q, k, v: the
prompts causally over themselves ([U, H, P_max, hd], right-padded, ``is_causal``), and the
remainders over [their unit's prompt | themselves causally] ([N, H, L_max, P_max + L_max] with
a mask). Every flat position is the query of exactly one of the two, and the outputs are put
back in flat order by one gather. The LM head runs on the hidden state *before* each target
(for a remainder's first token, its unit's last prompt position, shared by the group), so the
log-probs are those of the padded forward, up to float rounding: the same function of the same
tokens (checked against ``sequence_logprobs`` in tests/spine/test_packing.py). Gradients flow to
the shared prompt from every trajectory, as they do through its copies in the padded batch.

Work saved at the peer benchmark's shape (2 groups x 8 of a 27-token prompt and <= 64 sampled
tokens, about 49 on average): the matmuls run on 838 flat tokens instead of 16 x 91 = 1456
padded ones. The attention's padding (to P_max + L_max per remainder) remains, and is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sidpt.logprobs import head_logprobs
from sidpt.model import numerics


@dataclass
class Packing:
    """Index tensors of one micro-batch's flat layout (S flat tokens, U units, n rows)."""

    tokens: torch.Tensor  # [1, S] int64
    positions: torch.Tensor  # [1, S] int64
    prefix: torch.Tensor  # [U, P_max] flat index of each unit's prompt token (padding: 0)
    rest: torch.Tensor  # [n, L_max] flat index of each row's remainder token (padding: 0)
    rest_unit: torch.Tensor  # [n] the unit of each row
    rest_prompt: torch.Tensor  # [n] the length of the prompt each row's remainder follows
    rest_mask: torch.Tensor  # [n, 1, L_max, P_max + L_max] bool: key visible to query
    order: torch.Tensor  # [S] where each flat position is in cat(prefix queries, rest queries)
    prefix_valid: torch.Tensor  # [U, P_max] bool
    rest_valid: torch.Tensor  # [n, L_max] bool
    exact: bool = False  # numerics = "exact": keys in absolute position order, numerics.attention
    rest_keys: torch.Tensor | None = None  # exact: [n, P_max + L_max] flat index of key j of each row
    rest_visible: torch.Tensor | None = None  # exact: [n, 1, L_max, P_max + L_max] bool
    _masks: tuple | None = None  # exact: the two numerics.BlockMask, built at the first layer

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The model's ``attn`` hook: q [1, H, S, hd], k and v [1, KV, S, hd] -> [1, H, S, hd]."""
        qf, kf, vf = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # [S, heads, hd]
        gqa = q.shape[1] != k.shape[1]
        pq, pk, pv = (x[self.prefix].transpose(1, 2) for x in (qf, kf, vf))  # [U, heads, P_max, hd]
        rq = qf[self.rest].transpose(1, 2)  # [n, H, L_max, hd]
        if self.exact:  # each row's keys at their absolute positions: the engine's key blocks
            if self._masks is None:
                G = q.shape[1] // k.shape[1]
                self._masks = (numerics.block_mask(numerics.causal_mask(pq.shape[2], q.device), G),
                               numerics.block_mask(self.rest_visible, G))
            out_p = numerics.attention(pq, pk, pv, self._masks[0])
            rk, rv = (x[self.rest_keys].transpose(1, 2) for x in (kf, vf))  # [n, KV, P_max + L_max, hd]
            out_r = numerics.attention(rq, rk, rv, self._masks[1])
        else:
            # prompts: causal over themselves (right padding: padded queries come last and are dropped)
            out_p = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=gqa)
            # remainders: their unit's prompt, then themselves causally
            rk = torch.cat((pk[self.rest_unit], kf[self.rest].transpose(1, 2)), dim=2)  # [n, KV, P_max + L_max, hd]
            rv = torch.cat((pv[self.rest_unit], vf[self.rest].transpose(1, 2)), dim=2)
            out_r = F.scaled_dot_product_attention(rq, rk, rv, attn_mask=self.rest_mask, enable_gqa=gqa)
        both = torch.cat((out_p.transpose(1, 2)[self.prefix_valid], out_r.transpose(1, 2)[self.rest_valid]))
        return both[self.order].transpose(0, 1)[None]  # [1, H, S, hd]


def units(tokens: torch.Tensor, prompt_len: torch.Tensor, group: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive rows that share their prompt: the same group id, prompt length and
    prompt tokens as the run's first row (one host sync)."""
    P, G = prompt_len.tolist(), group.tolist()
    out: list[list[int]] = []
    for i in range(len(P)):
        if out:
            j = out[-1][0]
            if G[i] == G[j] and P[i] == P[j] and torch.equal(tokens[i, : P[i]], tokens[j, : P[j]]):
                out[-1].append(i)
                continue
        out.append([i])
    return out


def build_packing(tokens: torch.Tensor, seq_len: torch.Tensor, prompt_len: torch.Tensor,
                  group: torch.Tensor, exact: bool = False) -> Packing:
    """The flat layout of rows ``tokens`` [n, T] (right-padded, ``seq_len`` [n] real tokens, the
    first ``prompt_len`` [n] of which are the prompt; a prompt may not be longer than its row).
    ``exact``: also each row's keys in absolute order (``numerics.attention`` needs key j at j)."""
    dev = tokens.device
    prompt_len = prompt_len.clamp(min=1)
    S_len, P_len = seq_len.tolist(), prompt_len.tolist()
    groups = units(tokens, prompt_len, group)
    flat_tok, flat_pos, prefix_rows, rest_rows, rest_unit = [], [], [], [], [0] * len(S_len)
    cursor = 0
    for u, rows in enumerate(groups):
        P = min(P_len[rows[0]], S_len[rows[0]])
        prefix_rows.append(list(range(cursor, cursor + P)))
        flat_tok.append(tokens[rows[0], :P])
        flat_pos.append(torch.arange(P, device=dev))
        cursor += P
        for i in rows:
            L = S_len[i] - P
            rest_rows.append((i, list(range(cursor, cursor + L))))
            rest_unit[i] = u
            flat_tok.append(tokens[i, P: S_len[i]])
            flat_pos.append(torch.arange(P, S_len[i], device=dev))
            cursor += L
    S = cursor  # rest_rows is in row order: units are runs of consecutive rows
    U, n = len(groups), len(S_len)
    P_max = max(len(r) for r in prefix_rows)
    L_max = max(1, max(len(r) for _, r in rest_rows))
    prefix = torch.zeros(U, P_max, dtype=torch.int64)
    prefix_valid = torch.zeros(U, P_max, dtype=torch.bool)
    for u, r in enumerate(prefix_rows):
        prefix[u, : len(r)] = torch.tensor(r, dtype=torch.int64)
        prefix_valid[u, : len(r)] = True
    rest = torch.zeros(n, L_max, dtype=torch.int64)
    rest_valid = torch.zeros(n, L_max, dtype=torch.bool)
    for i, r in rest_rows:
        if r:
            rest[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
            rest_valid[i, : len(r)] = True
    unit = torch.tensor(rest_unit, dtype=torch.int64)
    p_len = prefix_valid.sum(1)[unit]  # [n] prompt tokens each remainder sees
    j = torch.arange(P_max)
    see_prompt = (j[None, :] < p_len[:, None])[:, None, :].expand(n, L_max, P_max)  # [n, L_max, P_max]
    causal = torch.ones(L_max, L_max, dtype=torch.bool).tril()[None] & rest_valid[:, None, :]  # [n, L_max, L_max]
    mask = torch.cat((see_prompt, causal), dim=2)
    mask[~rest_valid] = False
    mask[..., 0] |= ~rest_valid  # a padded query sees one key (no all-masked row: no NaN)
    queries = torch.cat((prefix[prefix_valid], rest[rest_valid]))  # [S] flat positions in query order
    order = torch.empty(S, dtype=torch.int64)
    order[queries] = torch.arange(S)
    keys = visible = None
    if exact:  # key j of row i: its prompt's token j (j < p), then its remainder's token j - p
        jj = torch.arange(P_max + L_max)
        from_p = prefix[unit][:, jj.clamp(max=P_max - 1)]  # [n, P_max + L_max]
        from_r = rest.gather(1, (jj[None, :] - p_len[:, None]).clamp(0, L_max - 1))
        keys = torch.where(jj[None, :] < p_len[:, None], from_p, from_r)
        r_len = rest_valid.sum(1)  # [n]
        q_abs = p_len[:, None] + torch.arange(L_max)[None, :]  # [n, L_max]
        visible = (jj[None, None, :] <= q_abs[:, :, None]) & (jj[None, None, :] < (p_len + r_len)[:, None, None])
        keys, visible = keys.to(dev), visible[:, None].to(dev)
    return Packing(torch.cat(flat_tok)[None], torch.cat(flat_pos)[None], prefix.to(dev), rest.to(dev), unit.to(dev),
                   p_len.to(dev), mask[:, None].to(dev), order.to(dev), prefix_valid.to(dev), rest_valid.to(dev),
                   exact, keys, visible)


def source_index(pk: Packing, target: torch.Tensor) -> torch.Tensor:
    """Flat index of the hidden state that predicts each ``target`` [n, T] token, row-major [M]:
    position t - 1 of its row, in its unit's prompt or in its own remainder."""
    rows, t = target.nonzero(as_tuple=True)
    src = t - 1
    P = pk.rest_prompt[rows]  # [M] the unit's prompt length
    in_prompt = src < P
    from_prompt = pk.prefix[pk.rest_unit[rows], src.clamp(max=pk.prefix.shape[1] - 1)]
    from_rest = pk.rest[rows, (src - P).clamp(min=0)]
    return torch.where(in_prompt, from_prompt, from_rest)


def packed_logprobs(model, tokens: torch.Tensor, seq_len: torch.Tensor, prompt_len: torch.Tensor,
                    group: torch.Tensor, mask: torch.Tensor, entropy: bool = False, fused: bool = False):
    """``sequence_logprobs(model, tokens, entropy, mask, fused)`` through the packed layout: lp [n, T]
    with lp[:, t] = log p(tokens[:, t] | tokens[:, :t]) on the ``mask`` positions (0 elsewhere),
    their entropies when asked, and the number of flat tokens the forward ran on."""
    target = mask.clone()
    target[:, 0] = False
    pk = build_packing(tokens, seq_len, prompt_len, group, getattr(model, "numerics", "default") == "exact")
    picked, ents = head_logprobs(model, tokens[target], entropy, fused, tokens=pk.tokens, positions=pk.positions,
                                 attn=pk, select=source_index(pk, target))  # [M] each
    lp = torch.zeros(tokens.shape, dtype=picked.dtype, device=tokens.device).masked_scatter(target, picked)
    ent = None if ents is None else torch.zeros_like(lp).masked_scatter(target, ents)
    return lp, ent, pk.tokens.shape[1]
