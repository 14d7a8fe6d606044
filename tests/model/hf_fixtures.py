"""Tiny random HF checkpoints written by transformers' own ``save_pretrained`` (the test oracle)."""

import torch
import transformers

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def hf_config(family: str, n_kv_heads: int = 2, tied: bool = False, **kw):
    base = dict(
        vocab_size=96, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, tie_word_embeddings=tied, rms_norm_eps=1e-6, max_position_embeddings=256,
    )
    base.update(kw)
    return FAMILIES[family](**base)


def make_hf_model(config, seed: int = 0):
    """An HF model with every weight random (norm weights and biases too, so that none is trivially 1 or 0)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def ragged_batch(vocab: int, lengths: list[int], seed: int = 0):
    """Right-padded tokens [B, T] and attention mask [B, T] for the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        tokens[i, n:] = 0  # pad id
    return tokens, mask


def masked_max_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """max |a - b| over the real (mask = 1) positions of [B, T, V] tensors."""
    return (a - b).abs()[mask.bool()].max().item()
