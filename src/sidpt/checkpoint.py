"""What a run saves of its policy: an HF checkpoint (config.json, safetensors, tokenizer files)."""

from __future__ import annotations

from pathlib import Path

from sidpt.model import save_checkpoint


def save_policy(full_weights, tok, args, out: Path, write: bool) -> None:
    """The trained policy as an HF checkpoint, written atomically (``write``: the main trainer
    rank) from the trainer's full-weight buckets (``Trainer.full_weights``: collective on the
    trainer mesh, every trainer rank iterates to the end). DCP sharded saves: issue 19."""
    state = {}
    for bucket in full_weights:
        if write:
            state.update({k: v.detach().clone() for k, v in bucket.items()})
    if write:
        extra = {n: tok.path / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                           "chat_template.jinja") if (tok.path / n).exists()}
        save_checkpoint(out, args, state, extra_files=extra)
