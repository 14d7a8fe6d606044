"""Batch-invariant kernels for exact mode on a GPU: a row's result is bitwise independent of the
batch it is in (how many rows share the call, where the row sits), so the engine's decode, its
chunked prefill and the trainer's forward give one token the same bits (``sidpt.model.numerics``
is the CPU version of the same contract; Thinking Machines, "Defeating Nondeterminism in LLM
Inference", 2025, the GPU one).

    matmul(x [M, K], w [N, K])          tiles of fixed BLOCK_M x BLOCK_N, the reduction over K
                                        in fixed BLOCK_K steps in one order, no split-K: the
                                        constants are fixed, never chosen by M
    rms_norm(x [M, D], weight, eps)     one row per program, the sum of squares over D in fixed
                                        BLOCK_D steps
    attention(q, k, v, q_start)         each query row folds the keys in blocks of KEY_BLOCK from
                                        absolute position 0 with one online-softmax order (the
                                        fixed key split exact mode defines): a block the row
                                        cannot see scales by exp(0) = 1 and adds exact zeros

Forward passes are the kernels; backward passes are ordinary torch (nothing needs them to be
batch-invariant). The torch path of each op is sidpt.model.numerics' own; the float64
references are the plain formulas.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels import backend
from kernels.tiles import dot_rows_tile

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# Fixed tiles: the invariance is that none of these depends on the batch.
BLOCK_M, BLOCK_N, BLOCK_K = 32, 32, 32
BLOCK_D = 64
KEY_BLOCK = 64  # sidpt.model.numerics.KEY_BLOCK: the trainer's and the engine's key split
BLOCK_Q = 16


# -- references ------------------------------------------------------------------------------


def matmul_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().T


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def attention_reference(q, k, v, q_start: torch.Tensor) -> torch.Tensor:
    """q [B, H, Tq, hd] at absolute positions q_start[b] + t; k, v [B, KV, L, hd]; query t sees
    keys j <= q_start[b] + t (causal over a cached prefix)."""
    B, H, Tq, hd = q.shape
    KV, L = k.shape[1], k.shape[2]
    kk = k.double().repeat_interleave(H // KV, dim=1)
    vv = v.double().repeat_interleave(H // KV, dim=1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(hd)  # [B, H, Tq, L]
    pos = q_start[:, None] + torch.arange(Tq, device=q.device)[None, :]  # [B, Tq]
    visible = torch.arange(L, device=q.device)[None, None, :] <= pos[:, :, None]  # [B, Tq, L]
    return torch.softmax(s.masked_fill(~visible[:, None], -torch.inf), -1) @ vv


# -- ops -------------------------------------------------------------------------------------


def _use_triton(t: torch.Tensor, impl: str | None) -> bool:
    impl = impl or backend(t.device)
    return impl != "torch" and t.dtype in (torch.float32, torch.float16)


def matmul(x: torch.Tensor, w: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """x @ w^T, x [M, K], w [N, K] -> [M, N] in x's dtype, float32 accumulation."""
    if not _use_triton(x, impl):
        from sidpt.model import numerics

        return numerics.linear(x, w)
    return _Matmul.apply(x, w)


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        x, w = x.contiguous(), w.contiguous()
        M, K = x.shape
        N = w.shape[0]
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        _matmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
            x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, IEEE=x.is_cuda and x.dtype == torch.float32)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy @ w, dy.T @ x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str | None = None) -> torch.Tensor:
    """RMSNorm of each row of x [M, D], in x's dtype (float32 statistics)."""
    if not _use_triton(x, impl):
        from sidpt.model import numerics

        return numerics.rms_norm(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        x = x.contiguous()
        M, D = x.shape
        y = torch.empty_like(x)
        _rms_norm_kernel[(M,)](x, weight, y, D, x.stride(0), eps, BLOCK_D=BLOCK_D)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            xr, wr = x.detach().requires_grad_(), weight.detach().requires_grad_()
            y = F.rms_norm(xr.float(), wr.shape, wr.float(), ctx.eps).to(x.dtype)
            dx, dw = torch.autograd.grad(y, (xr, wr), dy)
        return dx, dw, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: torch.Tensor,
              impl: str | None = None) -> torch.Tensor:
    """Causal attention over a cached prefix with the fixed key split (module docstring):
    q [B, H, Tq, hd] at positions q_start[b] + t, k and v [B, KV, L, hd] with key j at position j.
    The torch path: sidpt.model.numerics.attention on the same visibility."""
    if not _use_triton(q, impl):
        from sidpt.model import numerics

        B, _, Tq, _ = q.shape
        L = k.shape[2]
        pos = q_start[:, None] + torch.arange(Tq, device=q.device)[None, :]
        visible = (torch.arange(L, device=q.device)[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, Tq, L]
        return numerics.attention(q, k, v, visible)
    return _Attention.apply(q, k, v, q_start)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_start):
        ctx.save_for_backward(q, k, v, q_start)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, Tq, hd = q.shape
        KV, L = k.shape[1], k.shape[2]
        out = torch.empty_like(q)
        _attention_kernel[(B * H, triton.cdiv(Tq, BLOCK_Q))](
            q, k, v, q_start, out, H, KV, Tq, L, hd, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), 1.0 / math.sqrt(hd), BLOCK_Q=BLOCK_Q, KEY_BLOCK=KEY_BLOCK,
            HD_P2=max(16, triton.next_power_of_2(hd)), IEEE=q.is_cuda and q.dtype == torch.float32)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, q_start = ctx.saved_tensors
        with torch.enable_grad():
            qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
            out = attention_reference(qr, kr, vr, q_start).to(torch.float32)  # float64 math: a reference backward
            dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), dout.float())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# -- kernels ---------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _matmul_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < M, cols < N
        acc = dot_rows_tile(x_ptr, w_ptr, rows, cols, rmask, cmask, K, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K,
                            IEEE)  # one order, fixed steps: the row's sum never depends on M
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        ss = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + row * stride_x + d, mask=d < D, other=0.0).to(tl.float32)
            ss += x * x
        inv = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + row * stride_x + d, mask=d < D, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
            tl.store(y_ptr + row * stride_x + d, (x * inv * w).to(y_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, start_ptr, o_ptr, H, KV, Tq, L, HD, sq_b, sq_h, sq_t, sk_b, sk_h,
                          sk_t, scale, BLOCK_Q: tl.constexpr, KEY_BLOCK: tl.constexpr, HD_P2: tl.constexpr,
                          IEEE: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        kvh = h // (H // KV)
        t = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, HD_P2)
        tmask, dmask = t < Tq, d < HD
        q = tl.load(q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :], mask=tmask[:, None] & dmask[None, :],
                    other=0.0)
        pos = tl.load(start_ptr + b) + t  # absolute position of each query row
        m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        den = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, HD_P2], dtype=tl.float32)
        last = tl.minimum(tl.max(tl.where(tmask, pos, 0), axis=0) + 1, L)  # keys the tile's rows can see
        for j0 in range(0, last, KEY_BLOCK):  # blocks from key 0, in order
            j = j0 + tl.arange(0, KEY_BLOCK)
            jmask = j < L
            kv_off = b * sk_b + kvh * sk_h + j[:, None] * sk_t + d[None, :]
            k = tl.load(k_ptr + kv_off, mask=jmask[:, None] & dmask[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_Q, KEY_BLOCK]
            visible = (j[None, :] <= pos[:, None]) & jmask[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)  # a block the row cannot see: exp(0) = 1 once m is finite
            p = tl.where(visible, tl.exp(s - m_new[:, None]), 0.0)
            v = tl.load(v_ptr + kv_off, mask=jmask[:, None] & dmask[None, :], other=0.0)
            den = den * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / den[:, None]
        tl.store(o_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=tmask[:, None] & dmask[None, :])
