"""Paged decode attention: one new query token per sequence against its cached keys and values,
read in place from the engine's KV block pool through the sequence's block table: no gather of
each sequence's keys into a contiguous [B, L, KV, hd] copy first (on the CPU engine that gather
is about a tenth of a decode step; on a GPU it is a second pass over the whole cache).

    q [B, H, hd]; k_cache, v_cache [S, KV, hd] (S = (num_blocks + 1) x block_size rows: token s
    of block b at row b x block_size + s, sidpt.rollout.kv_cache); block_table [B, nb]; ctx [B],
    the keys each query sees (its own included)                            -> out [B, H, hd]

One program per (sequence, KV head) computes the G = H / KV query heads that share the head
(GQA), walking the sequence's blocks with an online softmax (Dao et al. 2022's recurrence;
vLLM's PagedAttention, Kwon et al. 2023, for the layout). Scores and accumulators are float32.
The torch path (and the reference) is the engine's own: gather, then softmax attention.
"""

from __future__ import annotations

import torch

from kernels import backend

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_table: torch.Tensor, ctx: torch.Tensor, block_size: int) -> torch.Tensor:
    """Float64: each sequence's keys gathered through its block table, masked past ``ctx``,
    softmax attention.  # [B, H, hd], [S, KV, hd] x2, [B, nb], [B] -> [B, H, hd]"""
    B, H, hd = q.shape
    KV, bs = k_cache.shape[1], block_size
    L = block_table.shape[1] * bs
    rows = (block_table[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(B, L)  # [B, L]
    keys, values = k_cache[rows].double(), v_cache[rows].double()  # [B, L, KV, hd]
    qd = q.double().view(B, KV, H // KV, hd)
    scores = torch.einsum("bkgd,blkd->bkgl", qd, keys) / hd**0.5  # [B, KV, G, L]
    visible = torch.arange(L, device=q.device)[None, :] < ctx[:, None]  # [B, L]
    scores = scores.masked_fill(~visible[:, None, None, :], -torch.inf)
    out = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores, -1), values)
    return out.reshape(B, H, hd)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           ctx: torch.Tensor, block_size: int, impl: str | None = None) -> torch.Tensor:
    """Attention of ``q`` [B, H, hd] over each sequence's first ``ctx`` cached keys (module
    docstring); the output in ``q``'s dtype. ``impl``: "triton", "interpret" or "torch"
    (default ``kernels.backend``)."""
    B, H, hd = q.shape
    KV = k_cache.shape[1]
    if H % KV or k_cache.shape != v_cache.shape or k_cache.shape[2] != hd or block_table.shape[0] != B:
        raise ValueError(f"paged attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}, block table {tuple(block_table.shape)}")
    impl = impl or backend(q.device)
    if impl == "torch" or q.dtype == torch.float64 or (impl == "interpret" and q.dtype == torch.bfloat16):
        return _torch_paged(q, k_cache, v_cache, block_table, ctx, block_size)
    out = torch.empty_like(q)
    G = H // KV
    _paged_decode_kernel[(B, KV)](
        q, k_cache, v_cache, block_table, ctx, out, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_table.stride(0), out.stride(0), out.stride(1), hd, G, 1.0 / hd**0.5,
        BLOCK=block_size, BLOCK_P2=triton.next_power_of_2(block_size), G_P2=max(triton.next_power_of_2(G), 1),
        HD_P2=triton.next_power_of_2(hd))
    return out


def _torch_paged(q, k_cache, v_cache, block_table, ctx, bs: int) -> torch.Tensor:
    """The engine's path: gather the visible blocks, masked SDPA (float32 scores for fp16/bf16)."""
    B, H, hd = q.shape
    KV = k_cache.shape[1]
    L = block_table.shape[1] * bs
    rows = (block_table[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(B, L)
    keys = k_cache[rows].transpose(1, 2)  # [B, KV, L, hd]
    values = v_cache[rows].transpose(1, 2)
    visible = (torch.arange(L, device=q.device)[None, :] < ctx[:, None])[:, None, None, :]  # [B, 1, 1, L]
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=visible,
                                                           enable_gqa=H != KV)
    return out[:, :, 0, :]


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, out_ptr, stride_qb, stride_qh, stride_ks,
                             stride_kh, stride_tb, stride_ob, stride_oh, HD, G, scale, BLOCK: tl.constexpr,
                             BLOCK_P2: tl.constexpr, G_P2: tl.constexpr, HD_P2: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, G_P2)
        d = tl.arange(0, HD_P2)
        gmask, dmask = g < G, d < HD
        heads = kvh * G + g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [G, HD]
        n_ctx = tl.load(ctx_ptr + b)
        m = tl.full([G_P2], float("-inf"), dtype=tl.float32)
        den = tl.zeros([G_P2], dtype=tl.float32)
        acc = tl.zeros([G_P2, HD_P2], dtype=tl.float32)
        s = tl.arange(0, BLOCK_P2)
        for blk in range(0, tl.cdiv(n_ctx, BLOCK)):
            block_id = tl.load(table_ptr + b * stride_tb + blk)
            rows = block_id * BLOCK + s
            valid = (s < BLOCK) & (blk * BLOCK + s < n_ctx)
            kv_mask = valid[:, None] & dmask[None, :]
            k = tl.load(k_ptr + rows[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0).to(tl.float32)  # [BLOCK, HD]
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, BLOCK]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.where(valid[None, :], tl.exp(scores - m_new[:, None]), 0.0)
            v = tl.load(v_ptr + rows[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=kv_mask,
                        other=0.0).to(tl.float32)
            den = den * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / den[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
