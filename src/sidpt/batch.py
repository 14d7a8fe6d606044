"""Key names of the trajectory batch: a TensorDict whose batch dim is trajectories.

Every stage (rollout, reward, trainer, reference, algorithm) reads and writes these keys; they
are the interface between stages. Sequences are **right-padded**: token t of trajectory n sits
at ``[n, t]`` for ``t < seq_len[n]`` and padding fills the rest. Per-token quantities are aligned
with ``tokens``: ``rollout_logprobs[n, t]`` is the log-probability of ``tokens[n, t]`` given
``tokens[n, :t]`` (position 0 has no prediction and is masked out by ``loss_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from tensordict import TensorDict

TOKENS = "tokens"  # [N, T] int64: prompt + response + tool observations, right-padded
SEQ_LEN = "seq_len"  # [N] int64: number of real tokens
PROMPT_LEN = "prompt_len"  # [N] int64: tokens of the first prompt
LOSS_MASK = "loss_mask"  # [N, T] bool: tokens the policy produced (prompt, padding, tool output 0)
ROLLOUT_LOGPROBS = "rollout_logprobs"  # [N, T] f32: log mu(token), the sampling distribution
POLICY_VERSION = "policy_version"  # [N, T] int32: weight version that produced each token
GROUP_ID = "group_id"  # [N] int64: prompt index; GRPO groups
REWARD = "reward"  # [N] f32: scalar reward
OLD_LOGPROBS = "old_logprobs"  # [N, T] f32: log pi_old, the trainer's recompute before update
REF_LOGPROBS = "ref_logprobs"  # [N, T] f32: log pi_ref, the frozen reference
ADVANTAGES = "advantages"  # [N, T] f32: per-token advantage
VALUES = "values"  # [N, T] f32: value-head estimates (GAE only)
FINISH_REASON = "finish_reason"  # [N] int8: see FINISH_* below

FINISH_STOP = 0  # end-of-sequence token or stop string
FINISH_LENGTH = 1  # hit max new tokens / context limit
FINISH_TOOL_LIMIT = 2  # hit max tool turns
FINISH_ERROR = 3  # environment or model-output error


@dataclass
class Trajectory:
    """One finished trajectory, as lists: one row of the batch (``trajectories_to_batch``), and
    what the async pipeline streams from a rollout rank to the trainer (``sidpt.dist.stream``)."""

    group: int  # its prompt group (GROUP_ID): the step's group, or the async pipeline's index across steps
    index: int  # its sample in the group
    tokens: list[int]
    loss_mask: list[bool]
    versions: list[int]
    logprobs: list[float]
    prompt_len: int
    finish_reason: int
    reward: float

    # computed once: the async schedule reads them for every pending trajectory at every arrival
    @cached_property
    def length(self) -> int:  # response tokens (sampled)
        return sum(self.loss_mask)

    @cached_property
    def version(self) -> int:  # the oldest weights that sampled one of its tokens
        return min((v for v, m in zip(self.versions, self.loss_mask) if m), default=-1)


def trajectories_to_batch(trajs: list[Trajectory], pad_id: int = 0) -> TensorDict:
    """The trajectory TensorDict (the keys above), right-padded to the longest, in the given order."""
    N, T = len(trajs), max(len(t.tokens) for t in trajs)
    tokens = torch.full((N, T), pad_id, dtype=torch.int64)
    mask = torch.zeros(N, T, dtype=torch.bool)
    lps = torch.zeros(N, T, dtype=torch.float32)
    vers = torch.full((N, T), -1, dtype=torch.int32)
    for i, t in enumerate(trajs):
        n = len(t.tokens)
        tokens[i, :n] = torch.tensor(t.tokens)
        mask[i, :n] = torch.tensor(t.loss_mask)
        lps[i, :n] = torch.tensor(t.logprobs)
        vers[i, :n] = torch.tensor(t.versions, dtype=torch.int32)
    return TensorDict({
        TOKENS: tokens, LOSS_MASK: mask, ROLLOUT_LOGPROBS: lps, POLICY_VERSION: vers,
        SEQ_LEN: torch.tensor([len(t.tokens) for t in trajs]), PROMPT_LEN: torch.tensor([t.prompt_len for t in trajs]),
        GROUP_ID: torch.tensor([t.group for t in trajs]),
        REWARD: torch.tensor([t.reward for t in trajs], dtype=torch.float32),
        FINISH_REASON: torch.tensor([t.finish_reason for t in trajs], dtype=torch.int8),
    }, batch_size=[N])
