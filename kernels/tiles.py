"""Triton building blocks shared by the kernels: the tile product both the fused log-prob head
and the batch-invariant matmul are made of."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

if triton is not None:

    @triton.jit
    def dot_rows_tile(a_ptr, b_ptr, rows, cols, rmask, cmask, K, stride_a, stride_b, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """a[rows] @ b[cols]^T over K in fixed BLOCK_K steps, one order, float32: [BLOCK_R, BLOCK_C]
        (a row's sum never depends on the other rows or their number). ``IEEE``: fp32 products
        without TF32 (Triton #5895)."""
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        return acc
