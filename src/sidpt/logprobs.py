"""The LM head's log-probs of chosen tokens and their entropies: through the logits, or fused
(``kernels/linear_logprob.py``: from the hidden states, no [M, V] tensor). The trainer's forwards
(padded and packed, ``sidpt.trainer``, ``sidpt.packing``) and the reference's meet here."""

from __future__ import annotations

import torch

from sidpt.model.model import token_logprobs
from sidpt.rl import entropy_from_logits


def head_logprobs(model, targets: torch.Tensor, entropy: bool, fused: bool, **forward):
    """The log-probs of ``targets`` [M] at the positions ``forward["select"]`` picks, and their
    entropies when asked (else None): through the logits [M, V], or ``fused``, through
    ``kernels.linear_logprob`` from the hidden states (the same values to float rounding, no
    [M, V] tensor). A model in exact numerics takes the engine's batch-invariant log-softmax."""
    if fused:
        from kernels.linear_logprob import linear_logprob

        lp, ent = model(**forward, head=lambda hidden, weight: linear_logprob(hidden, weight, targets))
        return lp, ent if entropy else None
    logits = model(**forward)  # [M, V]
    exact = getattr(model, "numerics", "default") == "exact"
    return token_logprobs(logits, targets, exact), entropy_from_logits(logits) if entropy else None
