"""One decoder-only transformer for the Llama, Qwen2 and Qwen3 families.

    Llama : RMSNorm, RoPE (default / linear / llama3 scaling), GQA, SwiGLU; optional bias on q/k/v/o
    Qwen2 : Llama + bias on q/k/v (not o)
    Qwen3 : Llama + RMSNorm on each head of q and k (before RoPE), no biases

Parameter names are Hugging Face's without the leading ``model.`` (``layers.3.self_attn.o_proj``),
except that, as in vLLM and gpt-fast, q/k/v are one ``qkv_proj`` and gate/up one ``gate_up_proj``:
one matmul instead of three (two) reads the activations once and halves the per-layer op count,
which is what bounds small-batch decode. ``hf_io.py`` splits and joins them at the checkpoint.

Attention is a pluggable callable: ``forward_hidden(tokens, positions, attn=...)`` calls
``attn(layer_idx, q, k, v)`` with the rotated q/k of one layer. The default is dense causal
attention (the trainer's forward); the rollout engine passes a paged-KV-cache attention, so the
engine and the trainer run this same model code. Numerics follow HF's eager/sdpa path exactly
where it matters for parity: RMSNorm in float32 then cast, RoPE tables in float32 then cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sidpt.model import numerics


@dataclass
class ModelArgs:
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0: dim // n_heads
    intermediate_size: int = 192
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {} or {"rope_type": "llama3"|"linear", ...}
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias)
    o_bias: bool = False  # Llama with attention_bias
    qk_norm: bool = False  # Qwen3
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    family: str = "llama"  # "llama" | "qwen2" | "qwen3": the model_type written to config.json
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: expected one of {FAMILIES}")
        # Each family's config.json can express only these combinations: keep saves faithful.
        expect = {
            "llama": (self.qkv_bias, False),  # attention_bias puts a bias on q, k, v and o
            "qwen2": (True, False),
            "qwen3": (False, True),
        }[self.family]
        if (self.qkv_bias, self.qk_norm) != expect or self.o_bias != (self.family == "llama" and self.qkv_bias):
            raise ValueError(
                f"family={self.family!r} needs qkv_bias={expect[0]}, qk_norm={expect[1]}, "
                f"o_bias={self.family == 'llama' and self.qkv_bias}; got qkv_bias={self.qkv_bias}, "
                f"qk_norm={self.qk_norm}, o_bias={self.o_bias}"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_scaling.rope_type={rope_type!r}: supported are default, linear, llama3")

    def num_params(self, embeddings: bool = True) -> int:
        d, h, kv, hd = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * hd * (h + 2 * kv) + h * hd * d
        attn += (h + 2 * kv) * hd * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * self.intermediate_size
        n = self.n_layers * (attn + mlp + 2 * d) + d
        if embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n


FAMILIES = ("llama", "qwen2", "qwen3")

# Named sizes for random-init models (tests, benchmarks, the CPU demo). Parameter counts include
# embeddings; vocab 8192 stands in for a small real tokenizer.
SIZES: dict[str, ModelArgs] = {
    "debug": ModelArgs(),
    "1M": ModelArgs(vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=384,
                    tie_embeddings=True),
    "6M": ModelArgs(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=688,
                    tie_embeddings=True),
    "25M": ModelArgs(vocab_size=8192, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, intermediate_size=1376,
                     tie_embeddings=True),
    "100M": ModelArgs(vocab_size=8192, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, intermediate_size=2560,
                      tie_embeddings=True),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norms, softmax, log-probs and RoPE tables: float32, or float64 for a float64
    model (so that a float64 run is float64 end to end, and equal on any CPU to ~1e-12)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_inv_freq(args: ModelArgs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 (float64 for a float64 model), with HF's
    linear or llama3 scaling."""
    hd = args.head_dim
    exps = torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").to(dtype) / hd
    inv_freq = 1.0 / (args.rope_theta**exps)
    sc = args.rope_scaling
    rope_type = sc.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin tables [B, T, head_dim] for integer ``positions`` [B, T] (computed in float32, or
    float64 for a float64 model)."""
    freqs = positions[..., None].to(inv_freq.dtype) * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, hd] by the half-split (GPT-NeoX/HF) convention."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, hd]
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def weight_left_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x^T)^T``: x [..., K], weight [N, K] -> [..., N].

    The same product with the operands in the other order, for a CPU BLAS whose kernels for a
    few rows times a big transposed weight (decode: M = batch rows) stream the weight slowly.
    MKL 2024.2 on a 2-core AVX2 AMD EPYC, a 25M model's 24 decode matmuls (68 MB of weights):
    M = 16 rows 13.2 ms as ``F.linear``, 8.8 ms this way; M = 64 31.1 -> 21.0 ms. The result is
    copied back to row-major (strided activations sent attention and the elementwise ops down
    slow paths: the decode ran 2x slower)."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    y = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias[:, None], weight, x2.t())  # [N, M]
    return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])


WEIGHT_LEFT_ROWS = (2, 64)  # rows (tokens) of x for which weight-left is taken
WEIGHT_LEFT_MIN = numerics.WEIGHT_LEFT_MIN  # weight elements (1 MB of fp32): smaller weights sit in cache


def use_weight_left(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``weight_left_linear`` beats ``F.linear`` for this product (measured, 2-core AVX2
    EPYC, MKL 2024.2, alternating in one run): a 25M model's decode matmuls 2.1x / 1.3x / 1.1x
    faster at 4 / 16 / 64 rows, 0.92x at 1 row and 0.83x at 256; the demo's 1M model (weights of
    64-250 KB, in cache) 0.6-0.9x at every row count."""
    rows = x.numel() // max(x.shape[-1], 1)
    return WEIGHT_LEFT_ROWS[0] <= rows <= WEIGHT_LEFT_ROWS[1] and weight.numel() >= WEIGHT_LEFT_MIN


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose product may be taken weight-left
    (``Transformer.set_weight_left``; the engine's copy on CPU), where ``use_weight_left`` says so."""

    weight_left = False
    exact = False  # numerics = "exact": sidpt.model.numerics.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return numerics.linear(x, self.weight, self.bias)
        if self.weight_left and use_weight_left(x, self.weight):
            return weight_left_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    exact = False  # numerics = "exact": sidpt.model.numerics.rms_norm

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return numerics.rms_norm(x, self.weight, self.eps)
        if x.dtype in (torch.float32, torch.float64):  # one op; bitwise the lines below (values and grads)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # In float32 (float64 stays), then back to the input dtype before the weight (as HF does).
        dtype = x.dtype
        x = x.to(compute_dtype(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(Protocol):
    """Computes attention for one layer: q [B, H, T, hd], k and v [B, KV, T, hd] -> [B, H, T, hd]."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def causal_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention over the given tokens (right padding needs no mask: padded keys
    come after every real query). GQA heads share KV heads without materialising copies."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class SelfAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hd = args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, hd
        # rows: the n_heads q heads, then the k heads, then the v heads (HF's q_proj; k_proj; v_proj)
        self.qkv_proj = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * hd, bias=args.qkv_bias)
        self.o_proj = Linear(args.n_heads * hd, args.dim, bias=args.o_bias)
        self.q_norm = RMSNorm(hd, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(hd, args.norm_eps) if args.qk_norm else None

    def forward(self, x, cos, sin, layer: int, attn: Attention) -> torch.Tensor:
        B, T, _ = x.shape  # [B, T, D]
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, self.head_dim)
        qk, v = qkv[:, :, : H + KV], qkv[:, :, H + KV :]
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        qk = apply_rope(qk, cos, sin)  # q and k heads rotated together
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, H|KV, T, hd]
        y = attn(layer, q, k, v.transpose(1, 2))  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(args.dim, 2 * args.intermediate_size, bias=False)  # [gate; up]
        self.down_proj = Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj.exact:
            return numerics.swiglu(x, self.gate_up_proj.weight, self.down_proj.weight)
        if self.gate_up_proj.weight_left and use_weight_left(x, self.gate_up_proj.weight):
            # feature-major between the two matmuls: no copy of the widest activation
            h = torch.mm(self.gate_up_proj.weight, x.reshape(-1, x.shape[-1]).t())  # [2I, M]
            gate, up = h.chunk(2, dim=0)
            y = torch.mm(self.down_proj.weight, F.silu(gate) * up)  # [D, M]
            return y.t().contiguous().view(x.shape)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = SelfAttention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, layer: int, attn: Attention) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied: the LM head reads embed_tokens.weight (one Parameter, nothing to keep in sync).
        self.lm_head = None if args.tie_embeddings else Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the RoPE frequencies.
        self._inv_freq = {}
        self._rope_table = {}
        self.weight_left = False
        self.numerics = "default"

    def set_numerics(self, mode: str) -> "Transformer":
        """``"exact"``: every matmul, norm, SiLU, RoPE table, attention (the default causal one
        here; the engine's and the packed trainer's read ``numerics`` too) and log-softmax through
        ``sidpt.model.numerics``, whose results do not depend on the batch; ``"default"``: torch's
        fastest ops."""
        if mode not in NUMERICS:
            raise ValueError(f"numerics={mode!r}: expected one of {NUMERICS}")
        self.numerics = mode
        for m in self.modules():
            if isinstance(m, (Linear, RMSNorm)):
                m.exact = mode == "exact"
        return self

    def set_weight_left(self, on: bool) -> "Transformer":
        """Take the matmuls (LM head included) as ``weight_left_linear`` where ``use_weight_left``
        says it is faster: the same products, other float rounding. For the engine's copy on a CPU
        (the trainer keeps ``F.linear``)."""
        self.weight_left = on
        for m in self.modules():
            if isinstance(m, Linear):
                m.weight_left = on
        return self

    def inv_freq(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (str(device), compute_dtype(dtype))
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.args, key[1]).to(device)
        return self._inv_freq[key]

    def rope_table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_seq_len, head_dim] for positions 0..max_seq_len-1 (exact mode gathers rows
        of it: the same values for a position in every batch; computing cos/sin per call rounds by
        the call's size)."""
        key = (str(device), dtype)
        if key not in self._rope_table:
            pos = torch.arange(self.args.max_seq_len, device=device)[None]
            cos, sin = rope_cos_sin(self.inv_freq(device, dtype), pos, dtype)
            self._rope_table[key] = (cos[0], sin[0])
        return self._rope_table[key]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward_hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn: Attention = causal_attention,
    ) -> torch.Tensor:
        """tokens [B, T] -> final-normed hidden states [B, T, D] (the LM head's input).

        ``positions`` [B, T] defaults to 0..T-1 on every row (right-padded batches)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)  # [B, T, D]
        if self.numerics == "exact":
            table_cos, table_sin = self.rope_table(x.device, x.dtype)
            cos, sin = table_cos[positions], table_sin[positions]  # [B, T, hd] each
            if attn is causal_attention:
                attn = numerics.dense_causal_attention
        else:
            cos, sin = rope_cos_sin(self.inv_freq(x.device, x.dtype), positions, x.dtype)  # [B, T, hd] each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, attn)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] in the model dtype."""
        if self.numerics == "exact":
            return numerics.linear(hidden, self.lm_head_weight)
        if self.weight_left and use_weight_left(hidden, self.lm_head_weight):
            return weight_left_linear(hidden, self.lm_head_weight)
        return F.linear(hidden, self.lm_head_weight)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attn: Attention = causal_attention,
        select: torch.Tensor | None = None,
        head=None,
    ):
        """tokens [B, T] -> logits [B, T, V]; with ``select`` (bool [B, T], or int64 [M] indices
        into the flattened B * T positions) only the logits of the selected positions, [M, V]:
        the LM head is skipped where no log-prob is needed (in RL most positions are prompt or
        observation). ``head``: a function of (hidden [M, D], the LM head's weight [V, D]) run
        instead of the logits (the fused log-prob kernel: no [M, V] tensor). Forward arguments,
        not separate methods, so that FSDP2's hooks on the root module run."""
        hidden = self.forward_hidden(tokens, positions, attn)
        if select is not None:  # a bool mask [B, T], or flat indices into B * T (may repeat)
            hidden = hidden[select] if select.dtype == torch.bool else hidden.flatten(0, 1)[select]
        return self.logits(hidden) if head is None else head(hidden, self.lm_head_weight)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init (normal(0, std) matrices, zero biases, unit norms), reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def build_model(
    args: ModelArgs, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> Transformer:
    """A randomly initialised model (see ``Transformer.init_weights``)."""
    model = Transformer(args)
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype)


NUMERICS = ("default", "exact")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """log softmax(logits)[targets] in float32 (float64 stays): logits [..., V], targets [...] -> [...].
    ``exact``: ``numerics.token_logprobs`` (the engine's formula in exact mode, batch-invariant)."""
    logits = logits.to(compute_dtype(logits.dtype))
    if exact:
        return numerics.token_logprobs(logits, targets)
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

