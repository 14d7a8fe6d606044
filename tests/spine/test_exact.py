"""numerics = "exact": every token's trainer log-prob is bitwise the engine's log mu.

256 trajectories of a float32 model generated under continuous batching (64 rows, chunked
prefill, groups of 4 sharing a prompt, prompts of 2-40 tokens), with a KV cache small enough to
force preemptions and recomputation, and tool calls (a stop string pauses a request; an
observation of 1-5 tokens resumes it, at most twice). The trainer then scores them packed with
two micro-batch budgets, padded, with autograd on (the fused step's forward), and on two gloo
ranks under FSDP2 with a third budget: max |log pi - log mu| must be 0.0 everywhere. Some weights
are taken weight-left and some not (``WEIGHT_LEFT_MIN`` is lowered to split this tiny model's
weights), so both product orders are covered. The default numerics on the same model misses by
about 1e-6 (asserted nonzero, so the test can tell the modes apart)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensordict import TensorDict

from sidpt.batch import GROUP_ID, LOSS_MASK, OLD_LOGPROBS, PROMPT_LEN, ROLLOUT_LOGPROBS, SEQ_LEN, TOKENS
from sidpt.model import build_model, numerics
from sidpt.model.model import ModelArgs
from sidpt.rollout import Engine, EngineConfig, Request, SamplingParams
from sidpt.trainer import OptimConfig, Trainer

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,x"  # "x" is the tool call's stop string
ARGS = ModelArgs(vocab_size=len(ALPHABET), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=192)
WEIGHT_LEFT_MIN = 8192  # qkv (128 x 64), gate_up, down weight-left; o_proj and the LM head F.linear
N_TRAJ = 256


class CharTokenizer:
    vocab_size = len(ALPHABET)

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids)


def policy(numerics_mode: str):
    numerics.WEIGHT_LEFT_MIN = WEIGHT_LEFT_MIN
    return build_model(ARGS, seed=11).set_numerics(numerics_mode)


def rollouts(model) -> tuple[TensorDict, dict]:
    """The engine's trajectories as a trainer batch, and the engine's statistics."""
    g = torch.Generator().manual_seed(7)
    engine = Engine(model, EngineConfig(block_size=8, num_blocks=48, max_seqs=64, max_model_len=128,
                                        max_prefill_tokens=96), tokenizer=CharTokenizer())
    params = {}
    for grp in range(N_TRAJ // 4):
        prompt = torch.randint(0, len(ALPHABET) - 1, (int(torch.randint(2, 41, (1,), generator=g)),), generator=g)
        for j in range(4):
            rid = (grp, j)
            params[rid] = SamplingParams(max_new_tokens=int(torch.randint(6, 33, (1,), generator=g)),
                                         stop_strings=("x",), seed=grp * 4 + j)
            engine.submit(Request(rid, prompt.tolist(), params[rid]))
    outs, tools = {}, 0
    while engine.has_work():
        for out in engine.step():
            if out.finish_reason == "tool" and out.tokens.count(ALPHABET.index("x")) <= 2:
                n = min(int(torch.randint(1, 6, (1,), generator=g)), engine.max_observation(out.id))
                if n > 0:
                    tools += 1
                    engine.resume(out.id, torch.randint(0, len(ALPHABET) - 1, (n,), generator=g).tolist())
                    continue
            outs[out.id] = out
            engine.release(out.id) if out.finish_reason == "tool" else None
    order = sorted(outs)
    T = max(len(outs[k].tokens) for k in order)
    b = TensorDict({TOKENS: torch.zeros(len(order), T, dtype=torch.int64),
                    LOSS_MASK: torch.zeros(len(order), T, dtype=torch.bool),
                    ROLLOUT_LOGPROBS: torch.zeros(len(order), T)}, batch_size=[len(order)])
    for i, k in enumerate(order):
        o = outs[k]
        b[TOKENS][i, : len(o.tokens)] = torch.tensor(o.tokens)
        b[LOSS_MASK][i, : len(o.tokens)] = torch.tensor(o.generated)
        b[ROLLOUT_LOGPROBS][i, : len(o.tokens)] = torch.tensor(o.logprobs)
    b[SEQ_LEN] = torch.tensor([len(outs[k].tokens) for k in order])
    b[PROMPT_LEN] = torch.tensor([outs[k].prompt_len for k in order])
    b[GROUP_ID] = torch.tensor([k[0] for k in order])
    return b, {**engine.stats, "tool_resumes": tools}


def max_gap(trainer: Trainer, batch: TensorDict, grad: bool = False) -> float:
    if grad:  # the fused step's forward: autograd on
        lp, _ = trainer._logprobs(trainer.model, batch, batch[LOSS_MASK])
        lp = lp.detach()
    else:
        lp = trainer.recompute(batch)[OLD_LOGPROBS]
    m = batch[LOSS_MASK]
    return float((lp[:, : m.shape[1]] - batch[ROLLOUT_LOGPROBS])[m].abs().max())


def worker(rank, world, port, batch):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)  # another thread count than the engine's run: invariance holds across it
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        trainer = Trainer(policy("exact"), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1.0, 700, pack=True), mesh=mesh)
        half = N_TRAJ // world
        gap = max_gap(trainer, batch[rank * half: (rank + 1) * half])
        assert gap == 0.0, f"rank {rank}: max |trainer - engine| = {gap}"
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # as in test_lean_dist: skip the FSDP/gloo teardown


@pytest.fixture(scope="module")
def exact_batch():
    saved = numerics.WEIGHT_LEFT_MIN
    try:
        batch, stats = rollouts(policy("exact"))
        yield batch, stats
    finally:
        numerics.WEIGHT_LEFT_MIN = saved


def test_exact_mode_trainer_equals_engine_bitwise(exact_batch, monkeypatch):
    monkeypatch.setattr(numerics, "WEIGHT_LEFT_MIN", WEIGHT_LEFT_MIN)
    batch, stats = exact_batch
    assert batch.batch_size[0] == N_TRAJ and int(batch[LOSS_MASK].sum()) > 3000
    assert stats["preemptions"] > 0 and stats["tool_resumes"] > 20 and stats["shared_prefill_tokens"] > 0, stats
    assert len(set(batch[PROMPT_LEN].tolist())) > 20  # mixed prompt lengths
    for budget, pack in ((4096, True), (300, True), (600, False)):
        trainer = Trainer(policy("exact"), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1.0, budget, pack=pack))
        assert max_gap(trainer, batch) == 0.0, (budget, pack)
    assert max_gap(Trainer(policy("exact"), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1.0, 1000, pack=True)), batch,
                   grad=True) == 0.0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, batch), nprocs=2, join=True)


def test_default_numerics_has_a_gap(monkeypatch):
    """The contrast: the same rollouts and trainer in default numerics differ by float rounding."""
    monkeypatch.setattr(numerics, "WEIGHT_LEFT_MIN", WEIGHT_LEFT_MIN)
    model = policy("default")
    batch, _ = rollouts(model)
    gap = max_gap(Trainer(model, OptimConfig(1e-3, 0.0, (0.9, 0.99), 1.0, 4096, pack=True)), batch)
    assert 0.0 < gap < 1e-3, gap
