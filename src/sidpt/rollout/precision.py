"""Emulated low precision: round to bf16 / fp16 / fp8-e4m3 at layer boundaries, compute in fp32.

On GPUs the engine runs natively in bf16 or fp16. CPUs without native bf16 matmuls compute those
at a fraction of fp32 speed, so to study the trainer–inference mismatch anywhere the engine can
instead keep an fp32 model and round

- every weight matrix once (at load and after each weight update), and
- the activations at layer boundaries: the embedding output and each block's output,

to the emulated format. fp8-e4m3 rounding is scaled (per tensor for weights, per token for
activations: x -> round(x / s) * s with s = amax / 448), as fp8 inference kernels do; bf16 and
fp16 round directly. Within a layer (attention scores, softmax, matmul accumulation) the
arithmetic stays fp32, which is also what tensor cores accumulate in.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0


def round_to(x: torch.Tensor, fmt: str, per_row: bool = False) -> torch.Tensor:
    """x rounded to ``fmt`` and returned in x's dtype."""
    dt = FORMATS[fmt]
    if fmt != "fp8":
        return x.to(dt).to(x.dtype)
    amax = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().amax()
    scale = (amax.float() / FP8_MAX).clamp_(min=1e-12)
    return ((x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(dt).float() * scale).to(x.dtype)


@torch.no_grad()
def round_weights(model: nn.Module, fmt: str) -> None:
    """Round every floating parameter of ``model`` in place."""
    for p in model.parameters():
        if p.is_floating_point():
            p.copy_(round_to(p, fmt))


def install_activation_rounding(model: nn.Module, fmt: str) -> list:
    """Forward hooks that round the embedding output and each block's output; returns the handles."""

    def hook(_module, _inputs, output):
        return round_to(output, fmt, per_row=True)

    handles = [model.embed_tokens.register_forward_hook(hook)]
    handles += [layer.register_forward_hook(hook) for layer in model.layers]
    return handles
