"""Batch-invariant numerics: the ops of ``numerics = "exact"``, shared by the trainer and the engine.

In exact mode every float op of the forward computes a token's result in a way that does not
depend on how many other tokens share the call, where the token sits in it, or how many threads
run it; so a token's log-probability is bitwise the same whether the engine decoded it one row at
a time, prefilled it in a chunk, recomputed it after a preemption, or the trainer scored it in
any micro-batch on any number of ranks. (Thinking Machines, "Defeating Nondeterminism in LLM
Inference", 2025, does this with batch-invariant GPU kernels; this module is the pure-torch CPU
version. On a GPU with triton, ``linear``, ``rms_norm``, ``dense_causal_attention`` and the
engine's paged exact attention run kernels/batch_invariant.py behind the same functions; the
trainer's packed exact forward (its two-part attention) and the log-softmax still run the torch
code there.)

Where a CPU torch op is *not* batch-invariant, and what this module does instead (measured on the
2-core AVX2 AMD EPYC with MKL 2024.2, ../shared/ENVIRONMENT.md; ``check_invariance`` re-checks it
on the machine at hand):

- **matmuls**: MKL takes other kernels for few rows: ``F.linear`` gave another result for the
  same row at M = 1..3 rows than at M >= 4 (identical from 4 to 16384 rows, at any row position,
  with 1 or 2 threads); ``W @ x^T`` (the weight-left product the engine's decode uses) differed
  up to M = 11. ``linear`` pads every product to at least ``MIN_ROWS`` rows. The operand order is
  a function of the weight alone (weight-left for weights of ``WEIGHT_LEFT_MIN`` elements and
  more, on CPU), not of the row count, so trainer and engine take the same one.
- **elementwise transcendentals** (exp, log, SiLU): torch's CPU loops compute whole SIMD vectors
  and a scalar tail, and the vector (SLEEF) and scalar (libm) functions can round differently;
  the tail is at the end of each thread's chunk, so an element's rounding depended on the
  tensor's size and the thread count. ``_aligned`` pads the flat tensor so that every element
  lies in a full vector of every thread's chunk (see ``_padded_numel``). Correctly rounded ops
  (+, -, *, /, sqrt) need nothing.
- **attention**: SDPA picks its own key split by sequence length. ``attention`` splits the keys
  into fixed blocks of ``KEY_BLOCK`` from absolute position 0 and folds them with one online-
  softmax order (FlashAttention's recurrence, Dao et al. 2022); a block no query of a row can
  see changes nothing bitwise (its scale factor is exp(0) = 1 and it adds exact zeros), so the
  number of blocks a call carries does not matter.
- **norms and log-softmax**: torch's fused RMSNorm row kernel, and log-softmax written out
  (max, aligned exp, row sum, aligned log), rows padded like the matmuls.

Inputs: float32 (MKL's float64 GEMM rounds the last 1-3 rows of a call by another
edge kernel, so a row's bits depend on its position there; ``check_invariance`` catches it). Backward passes are ordinary autograd (not batch-invariant; nothing
needs them to be).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_ROWS = 16  # rows every matmul and row reduction is padded to: weight-left was M-invariant from 12 (above)
ATTN_ROWS = 4  # rows of each attention matmul (bmm was M-invariant from 4 rows, for 16- and 64-key blocks)
KEY_BLOCK = 64  # keys per attention block (a multiple of the engine's default KV block of 16)
VEC = 64  # elements: a multiple of two AVX-512 vectors of floats (torch's loops unroll by 2)
GRAIN = 32768  # torch's internal GRAIN_SIZE: elementwise loops below it run on one thread
WEIGHT_LEFT_MIN = 1 << 18  # weight elements (1 MB of fp32): the engine's measured rule (model.use_weight_left)


class NumericsError(RuntimeError):
    pass


def _padded_numel(n: int) -> int:
    """A length >= n at which torch's elementwise CPU loop puts no element in a scalar tail, for
    any thread count up to ``torch.get_num_threads()``: at::parallel_for splits n elements into
    k = min(threads, ceil(n / GRAIN)) chunks of ceil(n / k); each chunk runs full vectors and
    then a scalar tail, so every chunk length must be a multiple of VEC."""
    if n <= GRAIN:
        return -(-n // VEC) * VEC
    step = VEC * math.lcm(*range(1, torch.get_num_threads() + 1))
    return -(-n // step) * step


def _aligned(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn``, computed on a flat copy padded by ``_padded_numel``
    (pad value 0: finite for exp, log and SiLU alike)."""
    n = x.numel()
    pad = _padded_numel(n) - n
    x = x.contiguous()  # one flat loop (a strided view would loop per row, its tails inside)
    if pad == 0:
        return fn(x)
    return fn(F.pad(x.view(-1), (0, pad)))[:n].view(x.shape)


def exp(x: torch.Tensor) -> torch.Tensor:
    return _aligned(torch.exp, x)


def log(x: torch.Tensor) -> torch.Tensor:
    return _aligned(lambda t: torch.log(t.clamp(min=torch.finfo(t.dtype).tiny)), x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return _aligned(F.silu, x)


def _pad_rows(x2: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    rows = MIN_ROWS if rows is None else rows
    return F.pad(x2, (0, 0, 0, rows - x2.shape[0])) if x2.shape[0] < rows else x2


class _WeightLeft(torch.autograd.Function):
    """y = (W @ x^T)^T with the usual backward (dx = dy W, dW = dy^T x): the forward is the
    engine's decode product, the backward the trainer's (weight-left backward was slower)."""

    @staticmethod
    def forward(ctx, x2, weight):
        ctx.save_for_backward(x2, weight)
        return torch.mm(weight, x2.t()).t().contiguous()

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        return grad @ weight, grad.t() @ x2


def weight_left(weight: torch.Tensor) -> bool:
    """The operand order for ``weight``: by its size alone, so every caller agrees."""
    return weight.device.type == "cpu" and weight.numel() >= WEIGHT_LEFT_MIN


def _gpu_kernels(x: torch.Tensor) -> bool:
    """On a GPU with triton: kernels/batch_invariant.py (fixed tiles, no split-K) instead."""
    if not x.is_cuda:
        return False
    from kernels import backend

    return backend(x.device) == "triton" and x.dtype in (torch.float32, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a row's result independent of the other rows: x [..., K] -> [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    M = x2.shape[0]
    if _gpu_kernels(x):
        from kernels.batch_invariant import matmul

        y = matmul(x2, weight)
        return (y if bias is None else y + bias).view(*x.shape[:-1], weight.shape[0])
    xp = _pad_rows(x2).contiguous()
    if not weight_left(weight):
        y = F.linear(xp, weight)
    elif torch.is_grad_enabled() and (xp.requires_grad or weight.requires_grad):
        y = _WeightLeft.apply(xp, weight)
    else:  # the same product without the autograd.Function's per-call cost (the engine's decode)
        y = torch.mm(weight, xp.t()).t().contiguous()
    y = y[:M]
    if bias is not None:
        y = y + bias  # after the product (addmm's fused bias may round otherwise)
    return y.view(*x.shape[:-1], weight.shape[0])


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP down(silu(gate) * up), x [..., D] -> [..., D]. With both weights weight-left
    (the engine's decode layout) it stays feature-major between the two products, [2I, M] then
    [D, M], as the default engine does (no copy of the widest activation); W @ A with a row-major
    A [K, M] was M-invariant from 12 columns, as W @ x^T was."""
    if not (weight_left(w_gate_up) and weight_left(w_down)):
        # two products into contiguous outputs: no copy of the gate half for the SiLU
        gate, up = (linear(x, w) for w in w_gate_up.chunk(2, dim=0))
        return linear(silu(gate) * up, w_down)
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    xp = _pad_rows(x2).contiguous()  # [Mp, D]
    h = torch.mm(w_gate_up, xp.t())  # [2I, Mp]
    gate, up = h.chunk(2, dim=0)  # contiguous halves
    y = torch.mm(w_down, silu(gate) * up)  # [D, Mp]
    return y.t()[:M].contiguous().view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm, x [..., D]: torch's fused row kernel (one row's result was the same at 1 to 3000
    rows and with or without autograd), rows padded so that no row is split over threads."""
    x2 = x.reshape(-1, x.shape[-1])
    if _gpu_kernels(x):
        from kernels.batch_invariant import rms_norm as kernel

        return kernel(x2, weight, eps).view(x.shape)
    return F.rms_norm(_pad_rows(x2), weight.shape, weight, eps)[: x2.shape[0]].view(x.shape)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim: x [..., V] -> [...]."""
    x2 = _pad_rows(x.reshape(-1, x.shape[-1]))
    m = x2.amax(-1, keepdim=True)  # exact
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = exp(x2 - m).sum(-1, keepdim=True)
    out = (m + log(s))[: x.numel() // max(x.shape[-1], 1), 0]
    return out.view(x.shape[:-1])


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """x - logsumexp(x): the engine's sampling distribution in exact mode. x [..., V]."""
    return x - logsumexp(x)[..., None]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target]: logits [..., V], targets [...] -> [...], one formula for the
    engine's log mu and the trainer's log pi."""
    return logits.gather(-1, targets[..., None]).squeeze(-1) - logsumexp(logits)


def causal_mask(T: int, device) -> torch.Tensor:
    """[1, 1, T, T] bool: query i sees keys 0..i."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


@dataclass
class BlockMask:
    """A visibility mask laid out for ``attention``, built once per forward (every layer reuses it).

    Rows are (t, g): query t of the Tq, query head g of the G sharing a KV head. ``chunks`` splits
    them into runs of consecutive rows that see the same number of key blocks (causal queries
    before position KEY_BLOCK need one, and so on), each with its bias [B, 1, n_c, nb_c * KEY_BLOCK]
    (0 where visible, -inf where not), padded to n_c >= ATTN_ROWS rows that see key 0. Folding a
    block a query does not see changes nothing bitwise, so a row gives the same bits in any chunk."""

    chunks: list  # [(row_start, row_end, nb, bias)]
    G: int
    Tq: int
    nblk: int
    _expanded: dict | None = None

    def per_kv(self, i: int, B: int, KV: int, dtype: torch.dtype) -> torch.Tensor:
        """Chunk i's bias for B sequences repeated over the KV heads, [B * KV, n_c, Lp_c]."""
        if self._expanded is None:
            self._expanded = {}
        key = (i, B, KV, dtype)
        if key not in self._expanded:
            bias = self.chunks[i][3]
            _, _, n, Lp = bias.shape
            self._expanded[key] = bias.to(dtype).expand(B, KV, n, Lp).reshape(B * KV, n, Lp)
        return self._expanded[key]


def block_mask(visible: torch.Tensor, G: int) -> BlockMask:
    """``visible`` [B or 1, 1, Tq, L] bool (key j at absolute position j) -> BlockMask."""
    B, _, Tq, L = visible.shape
    R = G * Tq
    vis = visible.clone()
    vis[..., 0] = True  # padded queries see key 0 (a real query does anyway): no row all -inf
    vis = vis[:, :, :, None].expand(B, 1, Tq, G, L).reshape(B, 1, R, L)  # rows (t, g)
    j = torch.arange(L, device=vis.device)
    last = torch.where(vis, j, 0).amax(-1).amax(0)[0]  # [R] the last key each row sees in any sequence
    nb = (last // KEY_BLOCK + 1).tolist()
    chunks, r0 = [], 0
    for r in range(1, R + 1):
        if r == R or nb[r] != nb[r0]:
            n, Lc = r - r0, nb[r0] * KEY_BLOCK
            v = vis[:, :, r0:r, :Lc] if Lc <= L else F.pad(vis[:, :, r0:r], (0, Lc - L), value=False)
            if n < ATTN_ROWS:  # module globals read at call time (tests patch them)
                v = F.pad(v, (0, 0, 0, ATTN_ROWS - n), value=False)
                v[:, :, n:, 0] = True
            bias = torch.zeros(v.shape, dtype=torch.float32, device=v.device).masked_fill_(~v, float("-inf"))
            chunks.append((r0, r, nb[r0], bias))
            r0 = r
    return BlockMask(chunks, G, Tq, max(nb))


def _fold(qc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, nb: int, scale: float):
    """One chunk: qc [B * KV, n, hd] over the first nb key blocks of k, v [B * KV, >= nb * KEY_BLOCK, hd]."""
    m = l = acc = None
    for b in range(nb):  # 3-D bmm, one GEMM layout for every caller; baddbmm scales, adds the 0 / -inf bias
        sl = slice(b * KEY_BLOCK, (b + 1) * KEY_BLOCK)
        s = torch.baddbmm(bias[:, :, sl], qc, k[:, sl].transpose(1, 2), alpha=scale)  # [B * KV, n, Bk]
        blk_max = s.detach().amax(-1, keepdim=True)  # [B * KV, n, 1]; a stabiliser: softmax does not depend on it
        if m is None:  # block 0: every row sees key 0, so m is finite
            m = blk_max
            p = exp(s - m)
            l, acc = p.sum(-1, keepdim=True), torch.bmm(p, v[:, sl])
            continue
        m_new = torch.maximum(m, blk_max)
        alpha = exp(m - m_new)
        p = exp(s - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + torch.bmm(p, v[:, sl])
        m = m_new
    return acc / l


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask | torch.Tensor) -> torch.Tensor:
    """Softmax attention with a fixed key-block split: q [B, H, Tq, hd], k and v [B, KV, L, hd]
    with key j at absolute position j of its sequence; ``mask`` a BlockMask or a visibility
    [B or 1, 1, Tq, L] bool (every query must see key 0: true of every causal layout).

    The keys are folded in blocks of KEY_BLOCK, in order, by the online-softmax recurrence
    m' = max(m, max s), l' = l e^(m - m') + sum e^(s - m'), o' = o e^(m - m') + e^(s - m') V;
    each run of queries folds only the blocks up to the last one it can see (exactly what
    folding the rest would give). GQA: the G = H / KV query heads of a KV head share its matmuls.
    The running max is detached: the output does not depend on it (it cancels), so the gradient
    is the same without a backward through the max."""
    B, H, Tq, hd = q.shape
    KV, L = k.shape[1], k.shape[2]
    G = H // KV
    bm = mask if isinstance(mask, BlockMask) else block_mask(mask, G)
    Lp = bm.nblk * KEY_BLOCK
    qg = q.reshape(B, KV, G, Tq, hd).transpose(2, 3).reshape(B * KV, Tq * G, hd)  # rows (t, g)
    k, v = ((t[:, :, :Lp] if Lp <= L else F.pad(t, (0, 0, 0, Lp - L))).reshape(B * KV, Lp, hd) for t in (k, v))
    outs = []
    for i, (r0, r1, nb, bias) in enumerate(bm.chunks):
        qc = qg[:, r0:r1]
        if bias.shape[2] > r1 - r0:
            qc = F.pad(qc, (0, 0, 0, bias.shape[2] - (r1 - r0)))
        out = _fold(qc, k, v, bm.per_kv(i, B, KV, q.dtype), nb, 1.0 / math.sqrt(hd))
        outs.append(out[:, : r1 - r0])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)  # [B * KV, Tq * G, hd]
    return out.view(B, KV, Tq, G, hd).transpose(2, 3).reshape(B, H, Tq, hd)


_CAUSAL: dict = {}


def dense_causal_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's ``attn`` hook in exact mode: ``model.causal_attention`` through ``attention``
    (the causal BlockMask of each (T, G) is built once)."""
    T, G = q.shape[2], q.shape[1] // k.shape[1]
    if _gpu_kernels(q):  # the same fixed key blocks, in one Triton kernel
        from kernels.batch_invariant import attention as kernel

        return kernel(q, k, v, torch.zeros(q.shape[0], dtype=torch.int64, device=q.device))
    key = (T, G, str(q.device))
    if key not in _CAUSAL:
        if len(_CAUSAL) > 256:
            _CAUSAL.clear()
        _CAUSAL[key] = block_mask(causal_mask(T, q.device), G)
    return attention(q, k, v, _CAUSAL[key])


def check_invariance(model, rows: tuple[int, ...] = (1, 3, MIN_ROWS, MIN_ROWS + 1, 100, 1000)) -> None:
    """Raise NumericsError unless, on this machine, ``linear`` gives each of the model's weights
    the same row result at every count of ``rows``, at the first and the last position, and
    ``attention`` the same output for one query alone and in a batch (fixed-seed random inputs)."""
    g = torch.Generator().manual_seed(0)
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or (tuple(p.shape), p.dtype) in seen:
                continue
            seen.add((tuple(p.shape), p.dtype))
            w = p.full_tensor() if hasattr(p, "full_tensor") else p
            x = torch.randn(max(rows), w.shape[1], generator=g, dtype=torch.float64).to(w.dtype).to(w.device)
            ref = linear(x[:1], w)[0]
            for M in rows:
                y = linear(x[:M], w)
                tail = linear(x[M - 1: M], w)[0]
                if not (torch.equal(y[0], ref) and torch.equal(y[-1], tail)):
                    raise NumericsError(f"model.numerics=exact: the matmul of {name} {tuple(w.shape)} is not "
                                        f"batch-invariant on this machine at {M} rows (see sidpt.model.numerics; "
                                        f"model.numerics=default runs)")
        dt = next(model.parameters()).dtype
        a = model.args
        q = torch.randn(8, a.n_heads, 5, a.head_dim, generator=g, dtype=torch.float64).to(dt)
        k = torch.randn(8, a.n_kv_heads, 150, a.head_dim, generator=g, dtype=torch.float64).to(dt)
        vis = torch.rand(8, 1, 5, 150, generator=g) < 0.7
        vis[3, :, 2, 100:] = False  # the lone query below sees only its first 100 keys
        full = attention(q, k, k, vis)
        one = attention(q[3:4, :, 2:3], k[3:4, :, :100], k[3:4, :, :100], vis[3:4, :, 2:3, :100])
        if not torch.equal(full[3:4, :, 2:3], one):
            raise NumericsError("numerics=exact: attention is not batch-invariant on this machine")
