"""FLOP and byte accounting of the model's phases, from its config and the actual token counts.

The convention is the one MFU figures use (PaLM, appendix B; ``torch.utils.flop_counter``): a
matmul of [M, K] x [K, N] is 2MKN FLOPs, attention is charged densely over its [T_q, T_kv] score
matrix (the causal half is not discounted: the kernels compute whole tiles along the diagonal,
and FlopCounterMode counts the same), and elementwise work (norms, RoPE, SiLU, softmax) is not
counted. Backward is 2x every matmul (the input's and the weight's gradient) and, for attention,
the 5 score-sized matmuls of FlopCounterMode's SDPA backward (2.5x the forward's 2). On CPU,
FlopCounterMode has no formula for the SDPA kernel torch picks there
(``_scaled_dot_product_flash_attention_for_cpu``) and counts no attention at all, so the tests
check the model with attention written as matmuls, and the SDPA convention against
FlopCounterMode's own formula.

    per token, per layer   2 * (D (H + 2 KV) hd + H hd D + 3 D I)      the linear layers
    per sequence, per layer  4 H T_q T_kv hd                           QK^T and AV (dense)
    the LM head            2 D V per token whose logits are computed

Decode reads every weight once per engine step (the batch shares them) and each sequence's KV
cache: 2 L KV hd bytes-per-element per cached token. A publish moves every parameter's bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sidpt.model import ModelArgs


def linear_flops_per_token(args: ModelArgs) -> int:
    """Forward FLOPs of every linear layer but the LM head, for one token."""
    D, H, KV, hd, I = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate_size
    return 2 * args.n_layers * (D * (H + 2 * KV) * hd + H * hd * D + 3 * D * I)


def head_flops_per_token(args: ModelArgs) -> int:
    """Forward FLOPs of the LM head for one token's logits."""
    return 2 * args.dim * args.vocab_size


def attention_flops(args: ModelArgs, q_len: int, kv_len: int) -> int:
    """Forward FLOPs of attention for ``q_len`` queries over ``kv_len`` keys, every layer (dense)."""
    return 4 * args.n_layers * args.n_heads * q_len * kv_len * args.head_dim


@dataclass
class Cost:
    """A phase's work: FLOPs and bytes moved to or from memory."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def forward_cost(args: ModelArgs, rows: list[int], logit_tokens: int | None = None) -> Cost:
    """One forward over ``rows`` (each row's length; a row attends over itself: a padded batch's
    rows are its padded length, a packed row is its whole length), with logits for
    ``logit_tokens`` tokens (default: every token)."""
    tokens = sum(rows)
    n_logits = tokens if logit_tokens is None else logit_tokens
    flops = linear_flops_per_token(args) * tokens + head_flops_per_token(args) * n_logits
    flops += sum(attention_flops(args, T, T) for T in rows)
    return Cost(float(flops))


def train_cost(args: ModelArgs, rows: list[int], logit_tokens: int | None = None,
               recompute_scores: bool = True) -> Cost:
    """One forward and backward over ``rows`` (``forward_cost``'s arguments): 3x the matmuls;
    attention's forward is 2 score-sized matmuls and its backward 5 (a fused kernel recomputes the
    scores: FlopCounterMode's SDPA formula) or, ``recompute_scores = False``, 4 (attention written
    as matmuls keeps them)."""
    tokens = sum(rows)
    n_logits = tokens if logit_tokens is None else logit_tokens
    flops = 3 * (linear_flops_per_token(args) * tokens + head_flops_per_token(args) * n_logits)
    flops += (3.5 if recompute_scores else 3.0) * sum(attention_flops(args, T, T) for T in rows)
    return Cost(float(flops))


def param_count(args: ModelArgs) -> int:
    """Parameters (the tied head counted once), for the bytes a publish or a decode step reads."""
    D, H, KV, hd, I, L = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate_size, args.n_layers
    per_layer = D * (H + 2 * KV) * hd + H * hd * D + 3 * D * I + 2 * D  # + the two RMSNorm weights
    per_layer += (H + 2 * KV) * hd * args.qkv_bias + D * args.o_bias + 2 * hd * args.qk_norm
    return L * per_layer + args.vocab_size * D * (1 if args.tie_embeddings else 2) + D


def kv_bytes_per_token(args: ModelArgs, elem_bytes: int) -> int:
    """KV cache bytes one cached token takes (every layer, K and V)."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem_bytes


def decode_step_cost(args: ModelArgs, contexts: list[int], elem_bytes: int) -> Cost:
    """One engine decode step: one new token for each running sequence (``contexts``: each one's
    cached length before the step). FLOPs: the linear layers and head per token, attention over
    the context plus itself; bytes: every weight once and each sequence's KV cache."""
    n, keys = len(contexts), sum(contexts) + len(contexts)  # each attends over its context and itself
    flops = (linear_flops_per_token(args) + head_flops_per_token(args)) * n + attention_flops(args, 1, keys)
    read = param_count(args) * elem_bytes + kv_bytes_per_token(args, elem_bytes) * keys
    return Cost(float(flops), float(read))


def prefill_cost(args: ModelArgs, new: list[int], cached: list[int], elem_bytes: int) -> Cost:
    """Prefill of ``new[i]`` tokens after ``cached[i]`` already cached ones (a tool observation
    appended, a shared prompt reused), logits of each row's last token only; bytes: the weights
    once and the KV written and read."""
    flops = linear_flops_per_token(args) * sum(new) + head_flops_per_token(args) * len(new)
    flops += sum(attention_flops(args, q, c + q) for q, c in zip(new, cached))
    kv = kv_bytes_per_token(args, elem_bytes) * sum(c + q for q, c in zip(new, cached))
    return Cost(float(flops), float(param_count(args) * elem_bytes + kv))


def publish_cost(args: ModelArgs, elem_bytes: int, receivers: int) -> Cost:
    """Bytes a weight publish moves: every parameter to each receiving rank."""
    return Cost(0.0, float(param_count(args) * elem_bytes * max(receivers, 1)))


# -- device peaks -----------------------------------------------------------------------------
#
# GPUs: the vendor's dense bf16 tensor-core FLOP/s (no sparsity) and HBM bandwidth, matched by a
# substring of torch.cuda.get_device_name(). CPUs have no such table (the model and the vector
# units vary by session): the peak is measured at start-up, as the best of a few fp32 GEMMs and
# copies in the rank's own threads.
GPU_PEAKS = {  # name substring: (FLOP/s, bytes/s)
    "B200": (2.25e15, 8.0e12),
    "H200": (9.89e14, 4.8e12),
    "H100 PCIe": (7.56e14, 2.0e12),
    "H100": (9.89e14, 3.35e12),  # SXM (HBM3)
    "A100-SXM4-80GB": (3.12e14, 2.039e12),
    "A100": (3.12e14, 1.555e12),  # 40 GB, and PCIe
}


@dataclass
class Peaks:
    """What one rank's device can do: FLOP/s and memory bytes/s, and where the figures came from."""

    flops: float
    bytes: float
    source: str  # "table: <name>" or "measured: <what>"


def measure_peaks(device: torch.device = torch.device("cpu"), repeats: int = 2, n: int = 1024,
                  copy_mb: int = 64) -> Peaks:
    """This rank's peaks now: the best of ``repeats`` GEMMs of ``n``^3 (fp32 on a CPU, bf16 on a
    GPU) and copies of ``copy_mb`` MiB (read + write), in the threads torch has. The defaults take
    0.2 s on one thread of this session's EPYC (every run measures at start-up); 2 x 64 MiB is
    past its L3. The benchmarks measure longer (``tools/bench_rollout.py``: 5 x 256 MiB)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    def best_of(fn) -> float:
        best = float("inf")
        for _ in range(repeats + 1):  # the first warms up
            if cuda:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
        return best

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / best_of(lambda: a @ b)
    x, y = torch.empty(copy_mb * 2**18, device=device), torch.ones(copy_mb * 2**18, device=device)
    bw = 2 * x.numel() * 4 / best_of(lambda: x.copy_(y))
    return Peaks(flops, bw, f"measured: {str(dtype).removeprefix('torch.')} {n}^3 GEMM, {copy_mb} MiB copy"
                            + ("" if cuda else f", {torch.get_num_threads()} thread(s)"))


def device_peaks(device: torch.device) -> Peaks:
    """The table's figures for a known GPU, else (a CPU, an unknown GPU's name) measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (f, w) in GPU_PEAKS.items():
            if key in name:
                return Peaks(f, w, f"table: {key} ({name})")
    return measure_peaks(device)
