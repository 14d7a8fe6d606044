"""Key names of the trajectory batch: a TensorDict whose batch dim is trajectories.

Every stage (rollout, reward, trainer, reference, algorithm) reads and writes these keys; they
are the interface between stages. Sequences are **right-padded**: token t of trajectory n sits
at ``[n, t]`` for ``t < seq_len[n]`` and padding fills the rest. Per-token quantities are aligned
with ``tokens``: ``rollout_logprobs[n, t]`` is the log-probability of ``tokens[n, t]`` given
``tokens[n, :t]`` (position 0 has no prediction and is masked out by ``loss_mask``).
"""

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
