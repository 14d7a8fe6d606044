"""Paged KV cache: a pool of fixed-size blocks per layer, a free list, and the attention that reads it.

Layout: ``k[layer]`` and ``v[layer]`` are ``[(num_blocks + 1) * block_size, KV, hd]``: token slot
``s`` of block ``b`` lives at row ``b * block_size + s``. The extra last block is scratch: padding
positions write there and padded block-table entries point there, so every gather is a plain
index and every masked key is finite.

``PagedAttention`` is the ``attn`` callable the model calls once per layer
(``model.forward_hidden(tokens, positions, attn=...)``): it writes the step's new keys and values
into their slots, then attends over each sequence's cached keys through its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sidpt.model import numerics


class OutOfBlocks(RuntimeError):
    pass


class PagedKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layers, (num_blocks + 1) * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch_block = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


@dataclass
class PagedAttention:
    """Attention of one forward over ``B`` sequences with ``Tq`` new tokens each (right-padded).

    write_slots [B, Tq]   cache row of each new token (padding -> the scratch block)
    read_slots  [B, L]    cache row of each key position 0..L-1 of each sequence
    mask        [B, 1, Tq, L] bool, True where query i may attend key j; None when ``fresh``
    fresh       every sequence starts at position 0: attend causally over the new keys directly
    exact       numerics = "exact": ``numerics.attention`` (fixed key blocks) instead of SDPA
    kernel      one-token queries through ``kernels.paged_attention`` with ``block_table`` [B, nb]
                and ``ctx`` [B] (keys visible): the blocks read in place, no gather
    q_start     [B] position of each row's first query: exact mode on a GPU folds the gathered
                keys with ``kernels.batch_invariant.attention`` (causal over the cached prefix)
    """

    cache: PagedKVCache
    write_slots: torch.Tensor
    read_slots: torch.Tensor | None
    mask: torch.Tensor | None
    fresh: bool
    exact: bool = False
    block_table: torch.Tensor | None = None
    ctx: torch.Tensor | None = None
    kernel: bool = False
    q_start: torch.Tensor | None = None
    _block_mask: object = None  # exact: numerics.BlockMask, built at the first layer
    _kv_read: torch.Tensor | None = None  # exact: cache row of each (sequence, KV head, key), first layer

    def _exact(self, q, k, v, visible):
        if self.q_start is not None and numerics._gpu_kernels(q):
            from kernels.batch_invariant import attention

            return attention(q, k, v, self.q_start)
        if self._block_mask is None:
            self._block_mask = numerics.block_mask(visible, q.shape[1] // k.shape[1])
        return numerics.attention(q, k, v, self._block_mask)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, KV, Tq, hd = k.shape
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [S, KV, hd]
        flat = self.write_slots.reshape(-1)
        kc.index_copy_(0, flat, k.transpose(1, 2).reshape(B * Tq, KV, hd))
        vc.index_copy_(0, flat, v.transpose(1, 2).reshape(B * Tq, KV, hd))
        gqa = q.shape[1] != KV
        if self.fresh:
            if self.exact:
                return numerics.dense_causal_attention(layer, q, k, v)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if self.kernel and Tq == 1 and not self.exact:  # decode: the blocks in place
            from kernels.paged_attention import paged_decode_attention

            out = paged_decode_attention(q[:, :, 0], kc, vc, self.block_table, self.ctx, self.cache.block_size)
            return out[:, :, None]  # [B, H, 1, hd]
        # A row gather of the flat slot list through F.embedding: on a 2-thread CPU it ran 1.5-3x
        # faster than index_select on the 4-D view and than advanced indexing (tools/bench_rollout.py).
        B, L = self.read_slots.shape
        if self.exact:  # gathered straight into [B, KV, L, hd], the layout numerics.attention computes in
            if self._kv_read is None:
                kv = torch.arange(KV, device=q.device)
                self._kv_read = (self.read_slots[:, None, :] * KV + kv[None, :, None]).reshape(-1)  # [B * KV * L]
            keys = F.embedding(self._kv_read, kc.view(-1, hd)).view(B, KV, L, hd)
            values = F.embedding(self._kv_read, vc.view(-1, hd)).view(B, KV, L, hd)
            return self._exact(q, keys, values, self.mask)
        flat_read = self.read_slots.reshape(-1)
        keys = F.embedding(flat_read, kc.view(kc.shape[0], KV * hd)).view(B, L, KV, hd).transpose(1, 2)
        values = F.embedding(flat_read, vc.view(vc.shape[0], KV * hd)).view(B, L, KV, hd).transpose(1, 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, enable_gqa=gqa)


def build_attention(cache: PagedKVCache, block_table: torch.Tensor, start: torch.Tensor, n_new: torch.Tensor,
                    Tq: int, exact: bool = False, kernel: bool = False) -> tuple[PagedAttention, torch.Tensor]:
    """Metadata for a forward in which row b holds tokens [start[b], start[b] + n_new[b]).

    block_table [B, nb] (padded with the scratch block), start and n_new [B] int64 on the cache's
    device. Returns the attention and the positions [B, Tq] to feed the model."""
    bs = cache.block_size
    device = block_table.device
    i = torch.arange(Tq, device=device)
    real = i[None, :] < n_new[:, None]  # [B, Tq]
    positions = torch.where(real, start[:, None] + i[None, :], start[:, None])  # pads reuse a real position
    block_of = (positions // bs).clamp_(max=block_table.shape[1] - 1)
    write = block_table.gather(1, block_of) * bs + positions % bs
    write = torch.where(real, write, cache.scratch_block * bs)  # [B, Tq]
    if bool((start == 0).all()):
        return PagedAttention(cache, write, None, None, fresh=True, exact=exact), positions
    ctx = start + n_new  # [B] keys visible after this step
    L = -(-int(ctx.max()) // bs) * bs
    nb = L // bs
    read = (block_table[:, :nb, None] * bs + torch.arange(bs, device=device)).reshape(-1, L)  # [B, L]
    if exact and L % numerics.KEY_BLOCK:  # whole key blocks, the rest read from the scratch block
        extra = numerics.KEY_BLOCK - L % numerics.KEY_BLOCK
        read = F.pad(read, (0, extra), value=cache.scratch_block * bs)
        L += extra
    j = torch.arange(L, device=device)
    q_pos = torch.where(real, positions, torch.zeros_like(positions))  # padded queries see key 0 only
    mask = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < ctx[:, None, None])  # [B, Tq, L]
    return PagedAttention(cache, write, read, mask[:, None], fresh=False, exact=exact, block_table=block_table[:, :nb],
                          ctx=ctx, kernel=kernel, q_start=start), positions
