"""The spine: loss masks of multi-turn trajectories, weight publishing, data-parallel correctness."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sidpt.batch import LOSS_MASK, OLD_LOGPROBS, ROLLOUT_LOGPROBS, TOKENS
from sidpt.data import episode_tensors
from sidpt.env.search.data import prepare_task, task_tokenizer
from sidpt.env.base import FINISH_CODES, EnvState, Episode, StepResult, Turn
from sidpt.model import build_model
from sidpt.model.model import ModelArgs
from sidpt.rollout import Engine, EngineConfig, SamplingParams
from sidpt.rollout.multiturn import Job, episodes_to_batch, run_episodes
from sidpt.trainer import OptimConfig, Trainer, sequence_logprobs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    task = prepare_task(tmp_path_factory.mktemp("task"), n_entities=30, seed=0, is_main=True)
    return task_tokenizer(task, 300, is_main=True, kind="bpe")


def test_hand_built_trajectory_masks_exactly_the_observation(tok):
    obs = "\n\n<information>Doc 1(Title: Ann Vel) Ann Vel was born in Kor.</information>\n\n"
    turns = [Turn("<search>Ann Vel</search>", True), Turn(obs, False), Turn("<answer>Kor</answer>", True)]
    prompt = tok.encode("Question: Where was Ann Vel born?\n")
    ids, mask = episode_tensors(Episode(None, turns, 1.0, {}), prompt, tok.encode)
    a, o, b = (tok.encode(t.text) for t in turns)
    assert ids == prompt + a + o + b
    assert mask == [False] * len(prompt) + [True] * len(a) + [False] * len(o) + [True] * len(b)
    assert tok.decode(ids[len(prompt) + len(a): len(prompt) + len(a) + len(o)]) == obs


class ScriptedEnv:
    """Answers the first turn with a fixed observation, ends the episode on the second."""

    stop_strings = ("e",)  # a letter the random model emits soon: forces a tool pause

    def __init__(self, observation):
        self.observation = observation

    def reset(self, sample):
        return EnvState(sample)

    def step(self, state, text):
        state.turn += 1
        if state.turn == 1:
            return StepResult(self.observation, False, 0.0, {"finish": None})
        return StepResult(None, True, 1.0, {"finish": "answer"})

    def end(self, state, finish):
        return StepResult(None, True, 0.0, {"finish": finish})


def test_engine_trajectory_masks_observation_tokens(tok):
    model = build_model(ModelArgs(vocab_size=tok.vocab_size), seed=3)
    engine = Engine(model, EngineConfig(block_size=8, num_blocks=64, max_model_len=256), tokenizer=tok)
    obs = "<information>retrieved text, not the policy's</information>"
    obs_ids = tok.encode(obs)
    jobs = [Job(g, j, None, tok.encode("Question: who?\n"), seed=10 * g + j) for g in range(2) for j in range(2)]
    eps = run_episodes(engine, ScriptedEnv(obs), jobs, SamplingParams(max_new_tokens=40), tok.encode, tok.decode)
    batch = episodes_to_batch(eps, FINISH_CODES)
    paused = 0
    for i, ep in enumerate(eps):
        if ep.info["finish"] != "answer":
            continue
        paused += 1
        gen = torch.tensor(ep.out.generated)
        P = ep.out.prompt_len
        first_turn = int(torch.nonzero(~gen[P:])[0]) if (~gen[P:]).any() else None
        start = P + first_turn
        assert batch[TOKENS][i, start: start + len(obs_ids)].tolist() == obs_ids
        expected = torch.zeros(batch[TOKENS].shape[1], dtype=torch.bool)
        expected[P:start] = True
        expected[start + len(obs_ids): len(ep.out.tokens)] = True
        assert torch.equal(batch[LOSS_MASK][i], expected)
        assert (batch[ROLLOUT_LOGPROBS][i][~expected] == 0).all() and (batch[ROLLOUT_LOGPROBS][i][expected] < 0).all()
    assert paused >= 2


def test_publish_makes_engine_equal_trainer(tok):
    args = ModelArgs(vocab_size=tok.vocab_size)
    trainer = Trainer(build_model(args, seed=1), OptimConfig(1e-2, 0.0, (0.9, 0.99), 1.0, 4096))
    engine = Engine(build_model(args, seed=2), EngineConfig(block_size=8, num_blocks=64, max_model_len=128))
    tokens = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    lp, _ = sequence_logprobs(trainer.model, tokens)
    lp.sum().backward()
    trainer.opt.step()  # weights moved away from the init
    from sidpt.controller import probe_check

    v = engine.update_weights(trainer.full_weights(bucket_mb=0.01))  # colocated publish, many small buckets
    assert v == 1
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, dict(trainer.model.named_parameters())[name])
    assert probe_check(trainer, engine, tokens[0, :6].tolist(), n=10) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_rl_row(out_dir: Path) -> dict:
    rows = [json.loads(line) for line in (out_dir / "t" / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if "loss/total" in r)


def test_torchrun_two_ranks_equal_single_process(tmp_path):
    common = [str(ROOT / "configs" / "debug.toml"), "--run.name=t", "--run.steps=1", "--sft.steps=0",
              f"--env.dir={tmp_path / 'task'}", "--algo.entropy_coef=1.0", "--run.verify_publish=true",
              "--run.threads=1", "--task.eval_questions=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "sidpt", *common, f"--run.out_dir={tmp_path / 'one'}"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                            "--master-port", str(_free_port()), "-m", "sidpt", *common,
                            f"--run.out_dir={tmp_path / 'two'}"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = _first_rl_row(tmp_path / "one"), _first_rl_row(tmp_path / "two")
    assert a["rollout/episodes"] == b["rollout/episodes"] == 16
    assert abs(a["loss/total"]) > 0.1 and a["train/grad_norm"] > 0.01  # not a comparison of zeros
    print({k: (a[k], b[k]) for k in ("loss/total", "train/grad_norm")})
    assert abs(a["loss/total"] - b["loss/total"]) <= 1e-5
    assert abs(a["train/grad_norm"] - b["train/grad_norm"]) <= 1e-5
    assert a["publish/weights_max_abs"] == 0.0 and b["publish/weights_max_abs"] == 0.0  # bitwise
    assert a["publish/probe_max_abs"] <= 1e-5 and b["publish/probe_max_abs"] <= 1e-5
    from tests.test_utilisation import assert_waterfall

    for row, ranks in ((a, 1), (b, 2)):  # the waterfall of one and of two colocated ranks (docs/rlu.md)
        assert_waterfall(row)
        assert row["rlu/device_s"] == pytest.approx(ranks * row["time/step"], rel=0.05)
    # every rank's results reach the files and the sums (issue 14, item 5: rank 0's alone before)
    assert a["rollout/zero_adv_seqs"] == b["rollout/zero_adv_seqs"] >= 4  # whole groups, over both ranks
    for name in ("before", "after"):
        one = (tmp_path / "one" / "t" / f"examples_{name}.jsonl").read_text().splitlines()
        two = (tmp_path / "two" / "t" / f"examples_{name}.jsonl").read_text().splitlines()
        assert len(one) == len(two) == 4
        assert [json.loads(x)["id"] for x in one] == [json.loads(x)["id"] for x in two]


def test_masked_logprobs_equal_full_logprobs_and_gradients():
    """The selected-positions LM head gives the full computation's values and gradients."""
    model = build_model(ModelArgs(vocab_size=97), seed=4)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 97, (3, 17), generator=g)
    mask = torch.rand(3, 17, generator=g) < 0.4
    w = torch.rand(3, 17, generator=g) + 0.5
    full, ent_full = sequence_logprobs(model, tokens, entropy=True)
    (torch.where(mask, full * w, 0.0).sum() + torch.where(mask, ent_full, 0.0).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    part, ent_part = sequence_logprobs(model, tokens, entropy=True, mask=mask)
    (torch.where(mask, part * w, 0.0).sum() + torch.where(mask, ent_part, 0.0).sum()).backward()
    m = mask.clone()
    m[:, 0] = False
    torch.testing.assert_close(part[m], full[m], atol=1e-6, rtol=0)
    assert (part[~m] == 0).all() and (full[m] < 0).all()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss,agg,correction", [
    ("ppo", "token-mean", "token-tis"), ("gspo", "seq-mean-token-mean", "none"),
    ("cispo", "seq-mean-token-sum-norm", "icepop"), ("reinforce", "seq-mean-token-sum", "seq-mis"),
])
def test_training_only_the_signal_rows_is_exact(loss, agg, correction):
    """rl_step on the trajectories with a nonzero advantage (GRPO groups with unequal rewards),
    the normalisers counted on the whole batch, gives the whole batch's loss, gradient and clip
    fraction: the others' gradient is exactly 0. With a correction that only reweights they need
    no recompute either (REWEIGHT_ONLY: their TRAIN_MASK is their LOSS_MASK)."""
    import copy

    from tensordict import TensorDict

    from sidpt.batch import GROUP_ID, REWARD, SEQ_LEN
    from sidpt.rl import REWEIGHT_ONLY, TRAIN_MASK, apply_correction, compute_advantages
    from sidpt.trainer import signal_rows

    args = ModelArgs(vocab_size=61)
    g = torch.Generator().manual_seed(7)
    n, T = 12, 19
    seq_len = torch.randint(9, T + 1, (n,), generator=g)
    pos = torch.arange(T)[None, :]
    mask = (pos >= 4) & (pos < seq_len[:, None]) & (torch.rand(n, T, generator=g) < 0.8)
    reward = torch.tensor([0., 1., 1., 0., 1., 1., 1., 1., 0., 0., 0., 0.])  # groups 1, 2: equal rewards
    batch = TensorDict({
        TOKENS: torch.randint(0, 61, (n, T), generator=g), SEQ_LEN: seq_len, LOSS_MASK: mask,
        GROUP_ID: torch.arange(n) // 4, REWARD: reward,
    }, batch_size=[n])
    with torch.no_grad():  # an engine a little off the trainer: corrections weight and mask some tokens
        lp, _ = sequence_logprobs(build_model(args, seed=3), batch[TOKENS], mask=mask)
    batch[ROLLOUT_LOGPROBS] = torch.where(mask, lp + 0.4 * torch.randn(n, T, generator=g), 0.0)
    batch = compute_advantages(batch, "grpo")
    keep = signal_rows(batch, LOSS_MASK)
    assert keep.tolist() == [True] * 4 + [False] * 8
    results = []
    for lean in (False, True):
        trainer = Trainer(build_model(args, seed=3), OptimConfig(1e-2, 0.0, (0.9, 0.99), 1e9, 64))
        rows = keep if lean and correction in REWEIGHT_ONLY else None  # recompute the signal rows only
        part, _ = apply_correction(trainer.recompute(copy.deepcopy(batch), rows=rows), correction)
        if rows is not None:
            assert torch.equal(part[TRAIN_MASK], batch[LOSS_MASK])  # reweighting masks nothing
        stats = trainer.rl_step(part, agg=agg, loss=loss, loss_kwargs={}, kl_coef=0.0, entropy_coef=0.0,
                                norm_len=16, keep=keep if lean else None)
        results.append((stats, {k: p.grad for k, p in trainer.model.named_parameters()}))
    (full, g_full), (lean, g_lean) = results
    assert lean["train/seqs"] <= 4 < full["train/seqs"]
    assert lean["train/micro_batches"] < full["train/micro_batches"]  # less work, under a 64-token budget
    assert full["train/grad_norm"] > 1e-3 and full["train/tokens"] > 20  # not a comparison of zeros
    for k in ("loss/total", "loss/policy", "train/grad_norm", "train/tokens", "loss/clip_frac"):
        if k in full:
            assert abs(full[k] - lean[k]) <= 1e-6 * max(1.0, abs(full[k])), k
    for name, grad in g_full.items():  # the gradients (Adam's first step is about lr * sign(grad))
        torch.testing.assert_close(g_lean[name], grad, atol=1e-7, rtol=1e-5)


def test_reference_follows_the_warm_start():
    """After an SFT step, reset_reference makes the KL anchor the warm-started policy: the first RL
    step's reference log-probs equal the policy's (KL 0), where the stale reference (the weights
    the trainer was built with) is far off."""
    from tensordict import TensorDict

    from sidpt.batch import REF_LOGPROBS, SEQ_LEN

    args = ModelArgs(vocab_size=47)
    trainer = Trainer(build_model(args, seed=2), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1.0, 4096), reference=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 47, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 5:] = True
    batch = TensorDict({TOKENS: tokens, SEQ_LEN: torch.full((4,), 12), LOSS_MASK: mask}, batch_size=[4])
    for _ in range(3):
        trainer.sft_step(batch)
    stale = trainer.recompute(batch)
    assert (stale[OLD_LOGPROBS] - stale[REF_LOGPROBS])[mask].abs().max() > 0.1  # SFT moved the policy
    trainer.reset_reference()
    fresh = trainer.recompute(batch)
    assert torch.equal(fresh[OLD_LOGPROBS], fresh[REF_LOGPROBS])
    for (n, p), (_, r) in zip(trainer.model.named_parameters(), trainer.reference.named_parameters()):
        assert torch.equal(p, r), n


def test_nonfinite_gradient_skips_the_update_and_is_counted():
    """An inf gradient (injected by a hook on one weight) skips the step: weights and AdamW state
    stay bitwise as they were, the skip is counted; the next finite step updates as usual."""
    from tensordict import TensorDict

    from sidpt.batch import SEQ_LEN

    trainer = Trainer(build_model(ModelArgs(vocab_size=47), seed=2), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1.0, 4096))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 47, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 5:] = True
    batch = TensorDict({TOKENS: tokens, SEQ_LEN: torch.full((4,), 12), LOSS_MASK: mask}, batch_size=[4])
    assert trainer.sft_step(batch)["train/skipped_nonfinite"] == 0.0
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    state = {(i, k): v.clone() for i, st in enumerate(trainer.opt.state.values()) for k, v in st.items()
             if torch.is_tensor(v)}
    w = trainer.model.layers[0].mlp.down_proj.weight
    hook = w.register_hook(lambda grad: grad * float("inf"))
    stats = trainer.sft_step(batch)
    hook.remove()
    assert stats["train/skipped_nonfinite"] == 1.0 and not torch.isfinite(torch.tensor(stats["train/grad_norm"]))
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    after = {(i, k): v for i, st in enumerate(trainer.opt.state.values()) for k, v in st.items() if torch.is_tensor(v)}
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert trainer.sft_step(batch)["train/skipped_nonfinite"] == 0.0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
