"""Rollout: the native engine (paged KV cache, continuous batching, per-token logprobs, multi-turn)."""

from sidpt.rollout.engine import Engine, EngineConfig, Output, Request
from sidpt.rollout.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "Output", "Request", "SamplingParams"]
