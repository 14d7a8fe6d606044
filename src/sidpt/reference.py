"""The reference role on ranks of its own (``run.reference_ranks``): the frozen policy of the KL term.

On the trainer mesh the Trainer keeps the reference itself (``Trainer(reference=True)``). With
ranks of its own, each reference rank holds a full (replicated) frozen copy, filled from the
trainer's full weights after the warm-start (the same anchor as ``Trainer.reset_reference``), and
serves the trainer ranks t with ``t % K == k`` every step: tokens in, log-probs out
(``sidpt.dist.transfer.request_ref_logprobs`` / ``serve_ref_logprobs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from sidpt.batch import LOSS_MASK, TOKENS
from sidpt.trainer import micro_batches, sequence_logprobs


class Reference:
    def __init__(self, model: torch.nn.Module, micro_batch_tokens: int):
        self.model = model.eval().requires_grad_(False)
        self.micro_batch_tokens = micro_batch_tokens

    @torch.no_grad()
    def logprobs(self, batch: TensorDict) -> torch.Tensor:
        """log pi_ref of every loss token of ``batch`` [N, T] (0 elsewhere), micro-batch by
        micro-batch as ``Trainer.recompute`` computes them."""
        T = batch[TOKENS].shape[1]
        out = [F.pad(lp, (0, T - lp.shape[1])) for lp, _ in
               (sequence_logprobs(self.model, mb[TOKENS], mask=mb[LOSS_MASK])
                for mb in micro_batches(batch, self.micro_batch_tokens))]
        return torch.cat(out)

    @torch.no_grad()
    def load(self, buckets) -> None:
        """Copy full-weight buckets ({name: tensor}) into the frozen model."""
        params = dict(self.model.named_parameters())
        for bucket in buckets:
            for name, t in bucket.items():
                params[name].copy_(t)
