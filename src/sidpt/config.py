"""Typed run configuration: dataclasses, loaded from TOML, overridden by ``--section.key=value``.

Every field carries a docstring (the string literal under it); ``python -m sidpt.config --help``
prints them. Loading is strict: an unknown key, a wrong type or a value outside its choices raises
``ConfigError`` naming the key, the value and what was expected (with a did-you-mean for typos).

    cfg = load_config("configs/debug.toml", ["--model.dtype=bfloat16"])
    save_config(cfg, run_dir / "config.toml")   # the resolved config, written beside the run

Overrides take TOML values (``--run.seed=3``, ``--model.path="ckpt"``, ``--x.ids=[1,2]``); a value
that does not parse as TOML is taken as a bare string (``--model.dtype=bfloat16``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sidpt.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# The sections. A field's docstring is the string literal right under it.


@dataclass
class RunConfig:
    name: str = "debug"
    """Run name; outputs go to ``<out_dir>/<name>/``."""
    out_dir: str = "runs"
    """Directory that holds one sub-directory per run."""
    overwrite: bool = False
    """Run into a run directory that holds an earlier run's outputs (config.toml, metrics.jsonl,
    examples, plot): its metrics are kept as metrics.<n>.jsonl, the rest is replaced. False: such
    a run is refused before anything is written."""
    seed: int = 0
    """Seed for every random number generator (torch, python, sampling)."""
    steps: int = 0
    """RL steps (0: no RL phase)."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """colocated: every role on every rank, phases alternate; disaggregated: separate meshes."""
    pipeline: Literal["sync", "async"] = "sync"
    """Disaggregated placement only. sync: every rollout rank has the new weights before it starts
    the next step's groups; async: rollout ranks keep generating while the trainer trains, under
    ``rollout.max_staleness``, with in-flight weight updates (``rollout.inflight``) and the
    trainer's batch chosen by ``train.schedule`` (``sidpt.schedule``)."""
    checkpoint_every: int = 0
    """Save a training checkpoint (model, AdamW, RNG, step: ``sidpt.checkpoint``) every this many
    RL steps, under <run dir>/checkpoints/ (0: none)."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    resume: Literal["never", "auto"] = "never"
    """auto: continue from the newest complete checkpoint in the run directory (an incomplete or
    corrupted one is reported and skipped; a directory written by another config is refused,
    naming the keys that differ; with no checkpoint yet, as after an elastic restart before the
    first, the run starts again there, its earlier metrics kept as metrics.<n>.jsonl); never:
    start from scratch."""
    delay_rank: int = -1
    """Fault injection for tests and benchmarks: the global rank that sleeps ``delay_s`` per engine
    step (a rollout rank) or per RL update (a trainer rank); -1: none."""
    delay_s: float = 0.0
    """Seconds of the injected delay (``delay_rank``)."""
    kill_rank: int = -1
    """Fault injection: the global rank that kills itself (SIGKILL) after RL step ``kill_step``, on
    the first attempt of an elastic job only (torchrun's TORCHELASTIC_RESTART_COUNT = 0); -1: none."""
    kill_step: int = 0
    """The RL step after which ``kill_rank`` dies."""
    rollout_ranks: int = 0
    """Ranks given to rollout when disaggregated (the first ones; 0 when colocated: all ranks)."""
    reference_ranks: int = 0
    """Disaggregated: ranks of their own for the KL reference (the last ones; 0: the reference
    lives on the trainer mesh)."""
    eval_every: int = 0
    """Evaluate on held-out questions every this many RL steps (0: only before and after)."""
    threads: int = 0
    """torch threads per rank (0: the cores this process may run on, divided among the ranks on this
    node). Fixed for the run, so a fixed-seed run stays deterministic; when other jobs share the
    cores, set it lower: on a loaded 2-core machine one engine run took 240 s at 2 threads and 9 s at
    1. The run prints the choice and warns when the load average says the cores are busy."""
    verify_publish: bool = False
    """After each weight publish, compare the engine's weights with the trainer's full weights
    (logged as publish/weights_max_abs; 0 means bitwise equal). Costs one extra all-gather."""
    trace_steps: str = ""
    """RL steps whose phases every rank records into ``trace.json``, a Chrome-trace timeline that
    ui.perfetto.dev opens (one track per rank): "a:b" is steps a to b-1, "a" one step, "" none. In
    the async pipeline a rollout rank records its time with weight versions a to b-1."""
    telemetry_s: float = 0.5
    """On a GPU with pynvml (``pip install 'sidpt[gpu]'``): seconds between readings of each rank's
    GPU (utilisation, memory, power, SM clock), aggregated per step as gpu/* and drawn in the
    trace; 0: off. Nothing to read on a CPU."""


@dataclass
class ModelConfig:
    path: str = ""
    """HF-layout checkpoint directory (config.json + *.safetensors + tokenizer.json). Empty: a
    randomly initialised model of size ``size`` with the task's own tokenizer."""
    size: str = "debug"
    """Named model size used when ``path`` is empty; see ``sidpt.model.model.SIZES``."""
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    """Parameter and activation dtype (norms, softmax and RoPE tables are computed in float32)."""
    vocab_size: int = 0
    """Vocabulary cap of a random-init model's tokenizer, trained on the task (0: every word)."""
    tokenizer: Literal["word", "bpe"] = "word"
    """A random-init model's task tokenizer: word-level (names copy as whole tokens) or byte BPE."""
    numerics: Literal["default", "exact"] = "default"
    """"exact": the trainer and the engine share one batch-invariant forward
    (``sidpt.model.numerics``), so every token's trainer log-prob is bitwise the engine's
    (mismatch 0 by construction; float32, native precision, temperature 1 without
    top-k/top-p). "default": torch's fastest ops (trainer and engine differ by float rounding)."""


@dataclass
class TaskConfig:
    eval_questions: int = 200
    """Held-out samples per evaluation (greedy)."""
    chat: bool = False
    """Render the prompt as a user message with the model's chat template (a pretrained model's
    ``tokenizer_config.json``), ending with the assistant header; False: raw text."""
    system: str = ""
    """System message before the user message when ``chat`` is set (empty: none)."""
    too_long: Literal["error", "skip"] = "error"
    """A train or held-out question whose prompt leaves no room to generate under
    ``rollout.max_model_len``: stop before the run with its file, line and id (error), or leave it
    out and report how many were left out (skip)."""
    reward: str = ""
    """Your own reward function as ``module:function``, called as ``function(sample, response_text,
    info) -> float`` on every finished episode (replacing the environment's reward); empty: the
    environment's own."""
    faults: Literal["isolate", "error"] = "isolate"
    """An environment call (reset, step, end) or reward function that raises, outlives
    ``call_timeout_s`` or returns a non-finite reward: end that episode with reward 0, count it
    (``rollout/faults``) and log it with its sample to ``faults_rank<r>.jsonl`` (isolate), or stop
    the run naming the sample (error)."""
    call_timeout_s: float = 60.0
    """Longest wait for one environment or reward call, in seconds (0: no timeout, the calls run on
    the rollout loop's own thread)."""


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16
    """Prompts (groups) per RL step, over all ranks; must divide by the number of rollout ranks."""
    group_size: int = 8
    """Samples per prompt (GRPO group)."""
    max_new_tokens: int = 96
    """Generated tokens per episode over all turns."""
    max_model_len: int = 512
    """Prompt + all turns + observations, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (RL samples at 1: the logprobs are then the policy's own)."""
    top_p: float = 1.0
    """Nucleus truncation (1: none)."""
    top_k: int = 0
    """Top-k truncation (0: none)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_mb: float = 256.0
    """KV cache size per rank."""
    precision: Literal["native", "emulated-bf16", "emulated-fp16", "emulated-fp8"] = "native"
    """Engine precision: native, or emulated-bf16 / emulated-fp16 / emulated-fp8 on an fp32 model."""
    matmul: Literal["auto", "linear", "weight-left"] = "auto"
    """The engine's matmul operand order: weight-left ``(W @ x^T)^T`` is faster for MKL's
    few-row decode GEMMs on CPU (``sidpt.model.model.weight_left_linear``). auto and weight-left:
    on CPU (weight-left: on any device) for products of 2-64 rows with weights of 1 MB or more
    (``use_weight_left``), ``F.linear`` otherwise; linear: ``F.linear`` always."""
    speculative: int = 0
    """Speculative on-policy rollouts (sidpt.rollout.speculative): a draft in
    ``draft_precision`` proposes this many tokens a round, the exact policy accepts or resamples
    them, so tokens follow the exact policy and their log-probs are its own (0: the plain
    engine). Needs model.numerics = "exact"; single-turn environments."""
    draft_precision: Literal["emulated-bf16", "emulated-fp16", "emulated-fp8"] = "emulated-bf16"
    """The draft's emulated precision when ``speculative`` > 0."""
    max_staleness: int = 1
    """Async pipeline: no trained token was sampled by weights more than this many versions older
    than the trainer's (0: the synchronous run, step for step). Rollout ranks wait rather than
    start groups that could exceed it (``sidpt.schedule``)."""
    assign: Literal["claim", "static"] = "claim"
    """Async pipeline: which rollout rank runs which prompt group. claim: each rank takes the next
    group when it can start one (a fast rank runs more, a slow one holds back only its own);
    static: group g of a step on rank g % R, as the synchronous run places them."""
    inflight: Literal["continue", "requeue"] = "continue"
    """Async pipeline: what running requests do when new weights arrive between decode steps.
    continue: go on with the new weights (each token records the version that sampled it);
    requeue: abort and start again from the prompt with the new weights."""
    inflight_kv: Literal["keep", "recompute"] = "keep"
    """Async pipeline, ``inflight = "continue"``: keep the KV cache the old weights computed, or
    drop it so every running request recomputes its cache with the new weights."""


@dataclass
class AlgoConfig:
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    """Advantage estimator (sidpt.rl.advantages)."""
    norm_std: bool = True
    """GRPO: divide by the group's reward std."""
    loss: Literal["ppo", "gspo", "gspo_token", "cispo", "reinforce", "is_pg"] = "ppo"
    """Policy loss (sidpt.rl.losses)."""
    eps_low: float = 0.2
    """Lower clip range of the ratio."""
    eps_high: float = 0.28
    """Upper clip range of the ratio (clip-higher)."""
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    """Loss aggregation over tokens and trajectories."""
    kl_coef: float = 0.0
    """KL-to-reference coefficient in the loss (0: no reference model)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    correction: Literal["none", "token-tis", "token-mis", "seq-tis", "seq-mis", "geo-mis", "icepop", "k3-rs",
                        "tr-mask"] = "none"
    """Trainer-inference mismatch correction (sidpt.rl.correction.CORRECTION_MODES; a test keeps the
    two lists equal, so that this module imports nothing of the roles)."""
    correction_form: Literal["decoupled", "bypass"] = "decoupled"
    """decoupled: PPO ratio against the trainer's recompute; bypass: against the engine's logprobs."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal."""


@dataclass
class TrainConfig:
    lr: float = 1e-5
    """AdamW learning rate of the RL phase (the peak, with a schedule)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: constant, or a cosine decay to ``min_lr_frac * lr`` at the last RL step."""
    warmup_steps: int = 0
    """RL steps of linear warmup from lr / (warmup_steps + 1) to lr (0: none)."""
    min_lr_frac: float = 0.1
    """The cosine schedule's final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    micro_batch_tokens: int = 16384
    """Padded tokens per micro-batch (rows x longest)."""
    publish_bucket_mb: float = 64.0
    """Bucket size of the weight publish from trainer to engine."""
    mini_batches: int = 1
    """Optimizer steps per pass over the step's batch (PPO mini-batches, verl's
    ``ppo_mini_batch_size``): each rank's rows split into this many consecutive chunks. From the
    second on, pi differs from pi_old, so the ratio and the clip act."""
    epochs: int = 1
    """Passes over the step's batch (verl's ``ppo_epochs``, TRL's ``num_iterations``)."""
    pack: bool = True
    """RL forwards (update, recompute, the trainer's reference) on packed micro-batches: one row
    without padding in which each group's shared prompt appears once (``sidpt.packing``); the
    same log-probs and gradients to float rounding. Off: right-padded rows."""
    fused_logprobs: Literal["auto", "on", "off"] = "auto"
    """The trainer's LM head and log-probs (and entropies) through the fused kernel
    (``kernels/linear_logprob.py``): never the [tokens, vocab] logits, their memory at 152k
    vocabularies is the trainer's largest tensor. auto: on a GPU (compiled Triton), off on a CPU,
    where the naive path is the one the golden run records (the fused torch path measured 0.90x
    to 0.94x its time at 1/12 to 1/20 of its memory, N = 4096, D = 1024, V = 32k and 152k:
    tools/bench_kernels.py; "on" takes it); never in ``model.numerics = "exact"`` (the fused
    sums are not the engine's batch-invariant ones)."""
    fuse_old_logprobs: bool = True
    """With one optimizer update per batch (``mini_batches = epochs = 1``) take pi_old from the
    training forward's own log-probs (detached: pi_old = pi before the only step) instead of a
    separate recompute forward; the update is the same to float rounding. Off: recompute always."""
    schedule: Literal["fifo", "group_complete", "paced", "debiased"] = "debiased"
    """Async pipeline: which finished trajectories a step trains (``sidpt.schedule``). fifo: the
    first to finish, stale ones dropped; group_complete: whole groups, first completed first, stale
    groups dropped; paced: oldest groups first, waiting for them, never dropped; debiased:
    earliest deadline first, filled with the first completed, never dropped."""
    bias_window: int = 8
    """Async pipeline: steps of the sliding window of the bias and starvation figures."""
    skip_zero_adv: bool = True
    """Leave trajectories whose advantage is 0 everywhere (GRPO groups with equal rewards) out of
    the forward and backward when the loss has no KL or entropy term: their gradient is exactly
    0 and they stay in the loss normalisers, so the update is unchanged (an exact saving)."""


@dataclass
class SFTConfig:
    steps: int = 0
    """SFT warm-start steps before RL (0: none)."""
    lr: float = 1e-3
    """SFT learning rate (the peak, with a schedule)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After the warmup: constant, or a cosine decay to ``train.min_lr_frac * sft.lr``."""
    warmup_steps: int = 0
    """SFT steps of linear warmup (0: none)."""
    batch_size: int = 32
    """Trajectories per SFT step, over all ranks."""
    n_trajectories: int = 300
    """Distinct SFT trajectories (built on entities outside train and held-out)."""
    context_weight: float = 0.0
    """Weight of the language-model loss on prompt and observation tokens (0: standard SFT, loss
    on the model's turns only)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and outputs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Prompts, evaluation and reward, for any environment."""
    env: dict[str, Any] = field(default_factory=lambda: {"name": "search"})
    """The environment: ``name`` (search, arith, or the module path of your own) and that
    environment's keys, validated by its own Config dataclass (``sidpt.env.load_environment``;
    ``python -m sidpt.config --help`` lists the built-in environments' keys)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The rollout engine and sampling."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL algorithm."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimiser of the RL phase."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """The supervised warm-start."""

    def validate(self) -> None:
        """Every value that can be checked before the run starts (the rest: at start-up, in the
        controller, before any training). Errors name the key."""
        r = self
        for key, lo in RANGES.items():
            section, name = key.split(".")
            v = getattr(getattr(r, section), name)
            if v < lo or (key in POSITIVE and v <= lo):
                raise ConfigError(f"{key}={v}: must be {'>' if key in POSITIVE else '>='} {lo}")
        if not 0 < self.rollout.top_p <= 1:
            raise ConfigError(f"rollout.top_p={self.rollout.top_p}: must be in (0, 1]")
        if self.rollout.group_size < 2 and self.algo.advantage in GROUP_BASELINES:
            raise ConfigError(f"rollout.group_size={self.rollout.group_size}: algo.advantage="
                              f"{self.algo.advantage!r} compares the samples of a group, so a group of one "
                              f"carries no signal; use >= 2 (or algo.advantage='reinforce_pp')")
        spec = self.run.trace_steps
        a, sep, b = spec.partition(":")
        if spec and not (a.isdigit() and (not sep or (b.isdigit() and int(b) > int(a)))):
            raise ConfigError(f"run.trace_steps={spec!r}: must be 'a:b' (steps a to b-1, b > a), 'a', or ''")
        if self.rollout.max_new_tokens >= self.rollout.max_model_len:
            raise ConfigError(f"rollout.max_new_tokens={self.rollout.max_new_tokens} must be < "
                              f"rollout.max_model_len={self.rollout.max_model_len}")
        if self.rollout.precision != "native" and self.model.dtype != "float32":
            raise ConfigError(f"rollout.precision={self.rollout.precision!r} emulates on a float32 model; "
                              f"model.dtype={self.model.dtype!r}")
        if self.model.numerics == "exact":
            bad = [(k, v, want) for k, v, want in (
                ("rollout.precision", self.rollout.precision, "native"), ("rollout.temperature", self.rollout.temperature, 1.0),
                ("rollout.top_p", self.rollout.top_p, 1.0), ("rollout.top_k", self.rollout.top_k, 0)) if v != want]
            if self.model.dtype != "float32":  # float64: MKL's dgemm rounds a call's last rows by position
                bad.append(("model.dtype", self.model.dtype, "float32"))
            if bad:
                k, v, want = bad[0]
                raise ConfigError(f"{k}={v!r}: model.numerics='exact' needs {want!r} (the trainer scores the engine's "
                                  f"own distribution with the same ops)")
        if self.train.fused_logprobs == "on" and self.model.numerics == "exact":
            raise ConfigError("train.fused_logprobs='on': exact numerics score the engine's batch-invariant "
                              "log-softmax; the fused kernel's sums are another order (use 'auto' or 'off')")
        if self.rollout.speculative and self.model.numerics != "exact":
            raise ConfigError(f"rollout.speculative={self.rollout.speculative}: the verifier is the exact policy; set "
                              f"model.numerics='exact'")
        if self.run.pipeline == "async":
            bad = [(k, v) for k, v in (("run.placement", self.run.placement != "disaggregated"),
                                       ("run.verify_publish", self.run.verify_publish),
                                       ("run.eval_every", self.run.eval_every),
                                       ("run.reference_ranks", self.run.reference_ranks),
                                       ("rollout.speculative", self.rollout.speculative)) if v]
            if bad:
                k = bad[0][0]
                raise ConfigError(f"{k}={getattr(getattr(self, k.split('.')[0]), k.split('.')[1])!r}: "
                                  f"run.pipeline='async' runs on disaggregated placement (the reference on the trainer "
                                  f"ranks), without the publish check, mid-run evaluations and the speculative engine")
        if (self.run.checkpoint_every or self.run.resume == "auto") and self.run.reference_ranks:
            raise ConfigError(f"run.reference_ranks={self.run.reference_ranks}: training checkpoints hold the KL "
                              f"reference of the trainer ranks, not of reference ranks of their own")
        if self.train.min_lr_frac > 1:
            raise ConfigError(f"train.min_lr_frac={self.train.min_lr_frac}: must be <= 1 (a fraction of the peak lr)")
        if self.algo.eps_low >= 1:
            raise ConfigError(f"algo.eps_low={self.algo.eps_low}: must be < 1 (the ratio's lower clip is 1 - eps_low)")


# Lower bounds (inclusive unless in POSITIVE) of the numeric fields that have one.
RANGES = {
    "run.steps": 0, "run.eval_every": 0, "run.threads": 0, "run.rollout_ranks": 0, "run.telemetry_s": 0.0,
    "model.vocab_size": 0, "task.eval_questions": 1, "rollout.prompts_per_step": 1, "rollout.group_size": 1,
    "rollout.max_new_tokens": 1, "rollout.max_model_len": 2, "rollout.temperature": 0.0, "rollout.top_k": 0,
    "rollout.block_size": 1, "rollout.kv_cache_mb": 0.0, "algo.eps_low": 0.0, "algo.eps_high": 0.0,
    "algo.kl_coef": 0.0, "algo.entropy_coef": 0.0, "train.lr": 0.0, "train.weight_decay": 0.0,
    "train.beta1": 0.0, "train.beta2": 0.0, "train.grad_clip": 0.0, "train.micro_batch_tokens": 1, "train.mini_batches": 1, "train.epochs": 1, "run.reference_ranks": 0,
    "train.publish_bucket_mb": 0.0, "sft.steps": 0, "sft.lr": 0.0, "sft.batch_size": 1, "sft.n_trajectories": 1,
    "sft.context_weight": 0.0, "train.warmup_steps": 0, "sft.warmup_steps": 0, "train.min_lr_frac": 0.0,
    "rollout.speculative": 0, "rollout.max_staleness": 0, "train.bias_window": 1, "run.delay_s": 0.0,
    "run.delay_rank": -1, "run.checkpoint_every": 0, "run.keep_checkpoints": 1,
    "run.kill_rank": -1, "run.kill_step": 0, "task.call_timeout_s": 0.0,
}
POSITIVE = {"rollout.kv_cache_mb", "train.lr", "sft.lr", "train.grad_clip", "train.publish_bucket_mb"}
GROUP_BASELINES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # advantages relative to the group


# ---------------------------------------------------------------------------------------------
# Loading, overriding, validating.


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (read from its source and its bases')."""
    docs = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)][1:]):
        docs.update(field_docs(base))
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to floats, lists to tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table ({_type_name(tp)}), got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(
                f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})"
            )
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, strictly: unknown keys and wrong types raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown key {full!r}{hint} (known in {prefix.rstrip('.') or 'the root'}: "
                f"{', '.join(fields)})"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(arg: str) -> tuple[list[str], Any]:
    """``--a.b=v`` -> (["a", "b"], v) with v parsed as a TOML value, else as a bare string."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"bad override {arg!r}: expected --section.key=value")
    key, raw = arg[2:].split("=", 1)
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"bad override {arg!r}: empty key component in {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for arg in overrides:
        parts, value = parse_override(arg)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"bad override {arg!r}: {'.'.join(parts[:-1])!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(
    path: str | os.PathLike | None, overrides: list[str] = (), cls: type = Config
) -> Any:
    """TOML file (or defaults when ``path`` is None) + overrides -> validated ``cls`` instance."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a TOML config file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a TOML config file (not UTF-8 text)") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or '<defaults>'}: {e}") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        raise ConfigError("None cannot be written to TOML; give the field a concrete default")
    raise ConfigError(f"cannot write {v!r} to TOML")


def dumps_config(obj: Any) -> str:
    """The config as TOML text, one ``[section]`` per nested dataclass."""
    lines: list[str] = []

    def emit(o: Any, section: str) -> None:
        items = o.items() if isinstance(o, dict) else [(f.name, getattr(o, f.name)) for f in dataclasses.fields(o)]
        is_table = lambda v: dataclasses.is_dataclass(v) or (isinstance(v, dict) and section == "")  # noqa: E731
        scalars = [(k, v) for k, v in items if not is_table(v)]
        if scalars:
            if section:
                lines.append(f"[{section}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars if v is not None)
            lines.append("")
        for k, v in items:
            if is_table(v):  # a section ([env] is a plain table: its keys belong to the environment)
                emit(v, f"{section}.{k}" if section else k)

    emit(obj, "")
    return "\n".join(lines)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    from sidpt.files import atomic_write  # a leaf too

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, dumps_config(obj))


def help_text(cls: type = Config, prefix: str = "") -> str:
    """Every key with its type, default and docstring."""
    out = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(f"\n[{prefix}{f.name}]  {docs.get(f.name, '')}")
            out.append(help_text(tp, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"  --{prefix}{f.name}={default!r}  ({_type_name(tp)})\n      {docs.get(f.name, '')}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m sidpt.config [config.toml] [--a.b=v ...]``: print the resolved config."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print(help_text())
        return
    path = argv[0] if argv and not argv[0].startswith("--") else None
    overrides = argv[1:] if path else argv
    try:
        print(dumps_config(load_config(path, overrides)))
    except ConfigError as e:
        sys.exit(f"config error: {e}")


if __name__ == "__main__":
    main()


def flatten(cfg: Config) -> dict[str, Any]:
    """``section.key -> value`` for every field (the [env] table's keys as ``env.<key>``)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        items = v.items() if isinstance(v, dict) else ((g.name, getattr(v, g.name)) for g in dataclasses.fields(v))
        out.update((f"{f.name}.{k}", x) for k, x in items)
    return out
