"""Fused linear -> log-prob + entropy: from hidden states h [N, D] and the LM head W [V, D], each
row's log-prob of its target token and the entropy of its next-token distribution at temperature
T, forward and backward, without materialising the [N, V] logits.

    z   = h W^T / T                                    tiles of [rows, columns], never all of it
    s   = sum_j e^(z_j - m),  t = sum_j e^(z_j - m) (z_j - m)      online over the columns, m the
    lse = m + log s,  H = log s - t / s,  lp = (z_target - m) - log s   running max (Milakov &
                                                                   Gimelshein 2018)

H comes from the shifted logits: for a peaked row log s and t / s are both near 0, where
lse - E[z] would cancel two large numbers. For the same reason m and log s are kept apart (the
backward's log p_j = (z_j - m) - log s): lse itself, rounded at the logits' magnitude, would cost
the top token's probability an ulp of the logit (3e-5 relative at logits of 200). The backward runs per vocabulary chunk of C columns (a
[rows, C] tile of the logits' gradient, never [N, V]):

    dz_j = g_lp (1[j = target] - p_j) - g_H p_j (log p_j + H),   p_j = e^((z_j - m) - log s)
    dh  += (dz / T) W_c,     dW_c = (dz / T)^T h

Liger's fused linear cross-entropy (Hsu et al. 2024) and Apple's Cut Cross-Entropy (Wijmans et
al. 2024) fuse the head with a *loss*. RL needs the per-token log-prob and entropy themselves (the
loss takes ratios of them), so this op returns both and takes their gradients. It departs from
Liger in not computing gradients during the forward (a per-token output's upstream gradient is
unknown then), and from CCE in giving the backward a materialised [rows, C] gradient tile, so its
two matmuls are plain GEMMs (cuBLAS, MKL): deterministic, no atomics. Cost: the backward
recomputes the logits, 8 N V D FLOPs in all against the naive 6 N V D.

Accumulators are float32 for any input dtype, float64 for float64 (Megatron PR #2206: bf16 sums
lose the log-sum-exp past ~250k columns). On a GPU fp32 ``tl.dot`` pins ``input_precision="ieee"``
(TF32 otherwise, Triton #5895); the interpreter has no bf16 ``tl.dot`` (Triton #11584), so bf16
and float64 take the torch path there. ``targets < 0`` (``IGNORE``) rows get lp = 0 and no lp
gradient; their entropy is still computed.
"""

from __future__ import annotations

import torch

from kernels import backend
from kernels.tiles import dot_rows_tile

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path needs neither
    triton = tl = None

IGNORE = -100

# Tiles. Torch path: a [R, C] tile of R x C = 2^20 float32 (4 MiB: the elementwise passes stay in
# cache) with C = 2048 columns: 0.90x / 0.94x the naive path's time at V = 32k / 152k, N = 4096,
# D = 1024 (tools/bench_kernels.py, its docstring has the table). Triton: BLOCK_N x BLOCK_V logit
# tiles, BLOCK_D along the model dimension; the backward's gradient buffer holds at most 2^24
# float32 (64 MiB) of [N, C].
TORCH_TILE, TORCH_COLS = 2**20, 2048
BLOCK_N, BLOCK_V, BLOCK_D = 32, 64, 32
GRAD_BUFFER = 2**24


def linear_logprob_reference(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                             dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: full logits, ``log_softmax``, in ``dtype`` (float64; float32: the naive
    path's own rounding).  # [N, D], [V, D], [N] -> [N], [N]"""
    z = (h.to(dtype) @ w.to(dtype).T) / temperature  # [N, V]
    logp = torch.log_softmax(z, dim=-1)
    lp = torch.where(targets >= 0, logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    return lp, -(logp.exp() * logp).sum(-1)


def linear_logprob(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target, entropy) per row, float32 (float64 for float64 inputs), with
    gradients to ``h`` and ``w``.  # [N, D], [V, D], [N] int64 -> [N], [N]

    ``impl``: "triton" (compiled, CUDA), "interpret" (the Triton code on CPU tensors), "torch";
    default ``kernels.backend``. bf16 under the interpreter and float64 anywhere run on torch."""
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_logprob: h {tuple(h.shape)}, w {tuple(w.shape)}, targets {tuple(targets.shape)}: "
                         f"need [N, D], [V, D], [N]")
    impl = impl or backend(h.device)
    if impl != "torch" and (h.dtype == torch.float64 or (impl == "interpret" and h.dtype == torch.bfloat16)):
        impl = "torch"
    return LinearLogprob.apply(h, w, targets, float(temperature), impl)


class LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, temperature: float, impl: str):
        h, w = h.contiguous(), w.contiguous()
        inv_t = 1.0 / temperature
        lp, ent, m, log_s = (_torch_forward if impl == "torch" else _triton_forward)(h, w, targets, inv_t, impl)
        ctx.save_for_backward(h, w, targets, m, log_s, ent)
        ctx.inv_t, ctx.impl = inv_t, impl
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, targets, m, log_s, ent = ctx.saved_tensors
        g_lp = torch.zeros_like(ent) if g_lp is None else g_lp.to(ent.dtype)
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.to(ent.dtype)
        g_lp = torch.where(targets >= 0, g_lp, 0.0)
        dh, dw = _backward(h, w, targets, m, log_s, ent, g_lp.contiguous(), g_ent.contiguous(), ctx.inv_t, ctx.impl)
        return dh if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None, None, None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- the torch path ------------------------------------------------------------------------------


def _tiles(N: int, V: int) -> tuple[int, int]:
    C = min(V, TORCH_COLS)
    return max(1, min(N, TORCH_TILE // C)), C


def _torch_forward(h, w, targets, inv_t: float, impl: str):
    N, V, acc = h.shape[0], w.shape[0], _acc_dtype(h.dtype)
    R, C = _tiles(N, V)
    lp, ent, mx, ls = (torch.empty(N, dtype=acc, device=h.device) for _ in range(4))
    for r0 in range(0, N, R):
        hr, tr = h[r0:r0 + R].to(acc), targets[r0:r0 + R]
        m = torch.full((hr.shape[0],), -torch.inf, dtype=acc, device=h.device)
        s, t, zt = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
        for v0 in range(0, V, C):
            z = (hr @ w[v0:v0 + C].to(acc).T) * inv_t  # [R, C]
            m_new = torch.maximum(m, z.amax(1))
            delta = m - m_new
            ds = torch.where(s > 0, delta, 0.0) * s  # the first chunk: s = 0, delta = -inf
            u = z - m_new[:, None]
            e = u.exp()
            t = delta.exp() * (t + ds) + (e * u).sum(1)
            s = delta.exp() * s + e.sum(1)
            m = m_new
            inside = (tr >= v0) & (tr < v0 + z.shape[1])
            zt += torch.where(inside, z.gather(1, (tr - v0).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        log_s = s.log()
        mx[r0:r0 + R], ls[r0:r0 + R] = m, log_s
        ent[r0:r0 + R] = log_s - t / s
        lp[r0:r0 + R] = torch.where(tr >= 0, (zt - m) - log_s, 0.0)
    return lp, ent, mx, ls


def _torch_grad_logits(z, tr, v0: int, m, log_s, ent, g_lp, g_ent, inv_t: float) -> torch.Tensor:
    """dL/d(h W^T) of one [R, C] tile from its logits ``z`` (already / T)."""
    logp = (z - m[:, None]) - log_s[:, None]
    p = logp.exp()
    dz = -(g_lp[:, None] + g_ent[:, None] * (logp + ent[:, None])) * p
    inside = (tr >= v0) & (tr < v0 + z.shape[1])
    rows = inside.nonzero().squeeze(1)
    dz[rows, tr[rows] - v0] += g_lp[rows]
    return dz * inv_t


def _backward(h, w, targets, m, log_s, ent, g_lp, g_ent, inv_t: float, impl: str):
    """dh and dW, one vocabulary chunk (and, on the torch path, one row block) at a time."""
    N, V, acc = h.shape[0], w.shape[0], _acc_dtype(h.dtype)
    dh = torch.zeros(N, h.shape[1], dtype=acc, device=h.device)
    dw = torch.empty_like(w)
    if impl == "torch":
        R, C = _tiles(N, V)
    else:
        R, C = N, max(BLOCK_V, min(V, GRAD_BUFFER // max(N, 1)) // BLOCK_V * BLOCK_V)
    for v0 in range(0, V, C):
        wc = w[v0:v0 + C].to(acc)
        dwc = torch.zeros_like(wc)
        for r0 in range(0, N, R):
            sl = slice(r0, r0 + R)
            hr = h[sl].to(acc)
            if impl == "torch":
                dz = _torch_grad_logits((hr @ wc.T) * inv_t, targets[sl], v0, m[sl], log_s[sl], ent[sl], g_lp[sl],
                                        g_ent[sl], inv_t)
            else:
                dz = _triton_grad_logits(h, w, targets, m, log_s, ent, g_lp, g_ent, inv_t, v0, wc.shape[0], impl)
            dh[sl] += dz @ wc
            dwc += dz.T @ hr
        dw[v0:v0 + C] = dwc.to(w.dtype)
    return dh.to(h.dtype), dw


# -- the Triton path -----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _linear_logprob_fwd_kernel(h_ptr, w_ptr, tgt_ptr, lp_ptr, ent_ptr, m_ptr, logs_ptr, N, V, D, stride_h, stride_w,
                                   inv_t, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                                   IEEE: tl.constexpr):
        """One program: BLOCK_N rows, every column in tiles of BLOCK_V, the online statistics."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        t = tl.zeros([BLOCK_N], dtype=tl.float32)
        zt = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cmask = cols < V
            z = dot_rows_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                             BLOCK_N, BLOCK_V, BLOCK_D, IEEE) * inv_t
            z = tl.where(cmask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            delta = m - m_new
            ds = tl.where(s > 0, delta, 0.0) * s  # the first tile: s = 0, delta = -inf
            u = tl.where(cmask[None, :], z - m_new[:, None], 0.0)
            e = tl.where(cmask[None, :], tl.exp(u), 0.0)
            eu = e * u
            alpha = tl.exp(delta)
            t = alpha * (t + ds) + tl.sum(eu, axis=1)
            s = alpha * s + tl.sum(e, axis=1)
            m = m_new
            zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        log_s = tl.log(s)
        tl.store(m_ptr + rows, m, mask=rmask)
        tl.store(logs_ptr + rows, log_s, mask=rmask)
        tl.store(ent_ptr + rows, log_s - t / s, mask=rmask)
        tl.store(lp_ptr + rows, tl.where(tgt >= 0, (zt - m) - log_s, 0.0), mask=rmask)

    @triton.jit
    def _linear_logprob_bwd_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, logs_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V, D,
                                   v_start, C, stride_h, stride_w, stride_dz, inv_t, BLOCK_N: tl.constexpr,
                                   BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """One [BLOCK_N, BLOCK_V] tile of the gradient of the logits h W^T over columns
        v_start .. v_start + C (the chunk), into dz [N, C]."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = v_start + local
        rmask = rows < N
        cmask = (local < C) & (cols < V)
        z = dot_rows_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, D, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_D, IEEE) * inv_t
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
        m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
        log_s = tl.load(logs_ptr + rows, mask=rmask, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
        logp = tl.where(cmask[None, :], (z - m[:, None]) - log_s[:, None], 0.0)  # padded columns: p = 0
        p = tl.where(cmask[None, :], tl.exp(logp), 0.0)
        dz = -(g_lp[:, None] + g_ent[:, None] * (logp + ent[:, None])) * p
        dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
        tl.store(dz_ptr + rows[:, None] * stride_dz + local[None, :], dz * inv_t,
                 mask=rmask[:, None] & cmask[None, :])


def _triton_forward(h, w, targets, inv_t: float, impl: str):
    N, V, D = h.shape[0], w.shape[0], h.shape[1]
    lp, ent, m, log_s = (torch.empty(N, dtype=torch.float32, device=h.device) for _ in range(4))
    ieee = impl == "triton" and h.dtype == torch.float32
    _linear_logprob_fwd_kernel[(triton.cdiv(N, BLOCK_N),)](
        h, w, targets, lp, ent, m, log_s, N, V, D, h.stride(0), w.stride(0), inv_t,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, IEEE=ieee)
    return lp, ent, m, log_s


def _triton_grad_logits(h, w, targets, m, log_s, ent, g_lp, g_ent, inv_t: float, v0: int, C: int, impl: str):
    N, V, D = h.shape[0], w.shape[0], h.shape[1]
    dz = torch.empty(N, C, dtype=torch.float32, device=h.device)
    ieee = impl == "triton" and h.dtype == torch.float32
    _linear_logprob_bwd_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(C, BLOCK_V))](
        h, w, targets, m, log_s, ent, g_lp, g_ent, dz, N, V, D, v0, C, h.stride(0), w.stride(0), dz.stride(0), inv_t,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, IEEE=ieee)
    return dz
