"""Multi-turn rollouts: the engine generates, an environment answers tool calls, until done.

Token-in/token-out: the prompt is tokenized once, every model turn stays as the sampled ids, and
each observation is tokenized on its own and appended with ``Engine.resume`` (KV cache kept).
The result is the trajectory batch of ``sidpt.batch`` (right-padded), with ``loss_mask`` set
exactly on the tokens the engine sampled. The environment is duck-typed (``sidpt.env.base.Env``:
``stop_strings``, ``reset``, ``step``, ``end``); this module does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from tensordict import TensorDict

from sidpt.batch import (
    FINISH_ERROR, FINISH_REASON, GROUP_ID, LOSS_MASK, POLICY_VERSION, PROMPT_LEN, REWARD, ROLLOUT_LOGPROBS,
    SEQ_LEN, TOKENS,
)
from sidpt.rollout.engine import Engine, Output, Request
from sidpt.rollout.sampling import SamplingParams


@dataclass
class Episode:
    key: Hashable  # (group id, index in group)
    group: int
    out: Output  # the engine's final view of the whole trajectory
    reward: float
    info: dict[str, Any]
    sample: Any = None  # the task row it ran on (``Job.sample``)


@dataclass
class Job:
    """One episode to run: its group (the prompt), its task row and its sampling seed."""

    group: int
    index: int
    sample: Any
    prompt_ids: list[int]
    seed: int


def run_episodes(engine: Engine, env, jobs: list[Job], params: SamplingParams,
                 encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]) -> list[Episode]:
    """Run every job to the end of its episode; returns episodes in job order."""
    states, turn_start, done = {}, {}, {}
    for j in jobs:
        key = (j.group, j.index)
        states[key] = env.reset(j.sample)
        turn_start[key] = len(j.prompt_ids)
        p = SamplingParams(**{**params.__dict__, "stop_strings": tuple(env.stop_strings), "seed": j.seed})
        engine.submit(Request(key, j.prompt_ids, p))
    while engine.has_work():
        for out in engine.step():
            key = out.id
            res = env.step(states[key], decode(out.tokens[turn_start[key]:]))
            if not res.done:
                obs = encode(res.observation)
                # the episode ends as "length" when the observation would not leave room to answer
                # (max_model_len, the cache, or max_new_tokens spent: then the engine said "length")
                if out.finish_reason == "tool" and len(obs) <= engine.max_observation(key):
                    engine.resume(key, obs)
                    turn_start[key] = len(out.tokens) + len(obs)
                    continue
                res = env.end(states[key], "length")
            if out.finish_reason == "tool":
                engine.release(key)
            done[key] = Episode(key, key[0], out, float(res.reward), dict(res.info))
    for j in jobs:
        done[(j.group, j.index)].sample = j.sample
    return [done[(j.group, j.index)] for j in jobs]


def episodes_to_batch(episodes: list[Episode], finish_codes: dict[str, int], pad_id: int = 0) -> TensorDict:
    """The trajectory TensorDict (keys in ``sidpt.batch``), right-padded to the longest episode.
    ``finish_codes`` maps the env's ``info["finish"]`` to the batch's FINISH_REASON codes."""
    N, T = len(episodes), max(len(e.out.tokens) for e in episodes)
    tokens = torch.full((N, T), pad_id, dtype=torch.int64)
    mask = torch.zeros(N, T, dtype=torch.bool)
    lps = torch.zeros(N, T, dtype=torch.float32)
    vers = torch.full((N, T), -1, dtype=torch.int32)
    for i, e in enumerate(episodes):
        n = len(e.out.tokens)
        tokens[i, :n] = torch.tensor(e.out.tokens)
        mask[i, :n] = torch.tensor(e.out.generated)
        lps[i, :n] = torch.tensor(e.out.logprobs)
        vers[i, :n] = torch.tensor(e.out.versions, dtype=torch.int32)
    return TensorDict({
        TOKENS: tokens, LOSS_MASK: mask, ROLLOUT_LOGPROBS: lps, POLICY_VERSION: vers,
        SEQ_LEN: torch.tensor([len(e.out.tokens) for e in episodes]),
        PROMPT_LEN: torch.tensor([e.out.prompt_len for e in episodes]),
        GROUP_ID: torch.tensor([e.group for e in episodes]),
        REWARD: torch.tensor([e.reward for e in episodes], dtype=torch.float32),
        FINISH_REASON: torch.tensor([finish_codes.get(e.info.get("finish"), FINISH_ERROR) for e in episodes],
                                    dtype=torch.int8),
    }, batch_size=[N])
