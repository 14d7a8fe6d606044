"""The policy model: one transformer (model.py), HF checkpoint I/O (hf_io.py), tokenizer (tokenizer.py)."""

from sidpt.model.hf_io import CheckpointError, load_checkpoint, read_args, save_checkpoint
from sidpt.model.model import SIZES, ModelArgs, Transformer, build_model, causal_attention, token_logprobs
from sidpt.model.tokenizer import Tokenizer, TokenizerError

__all__ = [
    "CheckpointError", "ModelArgs", "SIZES", "Tokenizer", "TokenizerError", "Transformer", "build_model",
    "causal_attention", "load_checkpoint", "read_args", "save_checkpoint", "token_logprobs",
]
