"""The fused log-prob path in the trainer (``train.fused_logprobs``, kernels/linear_logprob.py
under the Triton interpreter on this CPU) against the naive one (full logits): a recompute and a
PPO step with an entropy bonus, padded and packed, float32: log-probs, losses and the gradient
norm agree within 1e-6, every parameter's gradient within 1e-5 of its largest entry; after the
update (Adam divides float32 rounding by sqrt(v): a parameter whose gradient is ~0 moves by
+-lr on either path, so weights are not compared) the next step's figures within 1e-4 relative."""

import pytest
import torch

from kernels import backend
from sidpt.rl import apply_correction
from sidpt.trainer import OptimConfig, Trainer
from tests.spine.test_packing import ARGS, batch64


@pytest.mark.parametrize("pack", [False, True])
def test_fused_logprobs_give_the_naive_step(pack):
    batch = batch64().apply(lambda x: x.float() if x.is_floating_point() else x)  # the float64 recipe, in float32
    out = []
    for fused in (False, True):
        from sidpt.model import build_model

        t = Trainer(build_model(ARGS, dtype=torch.float32, seed=1),
                    OptimConfig(3e-2, 0.0, (0.9, 0.99), 1e9, 60, pack, fused))
        part, _ = apply_correction(t.recompute(batch), "token-tis")
        stats = t.rl_step(part, agg="token-mean", loss="ppo", loss_kwargs={}, kl_coef=0.0, entropy_coef=0.01)
        grads = {k: p.grad.clone() for k, p in t.model.named_parameters()}
        second = t.rl_step(part, agg="token-mean", loss="ppo", loss_kwargs={}, kl_coef=0.0, entropy_coef=0.01)
        out.append((stats, second, part, grads))
    (s0, q0, p0, w0), (s1, q1, p1, w1) = out
    assert abs(s0["loss/total"]) > 1e-3 and s0["train/grad_norm"] > 1e-3  # not a comparison of zeros
    for k in ("loss/total", "loss/policy", "train/entropy", "train/grad_norm"):
        assert abs(s0[k] - s1[k]) <= 1e-6, (k, s0[k], s1[k])
        assert abs(q0[k] - q1[k]) <= 1e-4 * max(1.0, abs(q0[k])), (k, q0[k], q1[k])  # after an Adam update
    assert float((p0["old_logprobs"] - p1["old_logprobs"]).abs().max()) <= 1e-6
    for k in w0:
        assert float((w0[k] - w1[k]).abs().max()) <= 1e-5 * max(float(w0[k].abs().max()), 1e-6), k


def test_the_fused_path_runs_the_triton_code_here():
    assert backend(torch.device("cpu")) == ("interpret" if not torch.cuda.is_available() else "torch")
