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

from tensordict import TensorDict

from sidpt.batch import FINISH_ERROR, Trajectory, trajectories_to_batch
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
    runner = EpisodeRunner(engine, env, params, encode, decode)
    for j in jobs:
        runner.add(j)
    done = {}
    while runner.has_work():
        done.update((e.key, e) for e in runner.step())
    return [done[(j.group, j.index)] for j in jobs]


class EpisodeRunner:
    """Episodes in flight on one engine: ``add`` jobs at any time, ``step`` returns the episodes
    that ended. Its state is explicit (``jobs``, env states, turn starts): the running requests a
    pipeline checkpoint captures."""

    def __init__(self, engine: Engine, env, params: SamplingParams, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str]):
        self.engine, self.env, self.params, self.encode, self.decode = engine, env, params, encode, decode
        self.jobs: dict[Hashable, Job] = {}
        self.states: dict[Hashable, Any] = {}
        self.turn_start: dict[Hashable, int] = {}

    def add(self, j: Job) -> None:
        key = (j.group, j.index)
        self.jobs[key] = j
        self.states[key] = self.env.reset(j.sample)
        self.turn_start[key] = len(j.prompt_ids)
        p = SamplingParams(**{**self.params.__dict__, "stop_strings": tuple(self.env.stop_strings), "seed": j.seed})
        self.engine.submit(Request(key, j.prompt_ids, p))

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[Episode]:
        """One engine step; the episodes that ended in it (tool calls are answered and resumed)."""
        engine, env, out_eps = self.engine, self.env, []
        for out in engine.step():
            key = out.id
            res = env.step(self.states[key], self.decode(out.tokens[self.turn_start[key]:]))
            if not res.done:
                obs = self.encode(res.observation)
                # the episode ends as "length" when the observation would not leave room to answer
                # (max_model_len, the cache, or max_new_tokens spent: then the engine said "length")
                if out.finish_reason == "tool" and len(obs) <= engine.max_observation(key):
                    engine.resume(key, obs)
                    self.turn_start[key] = len(out.tokens) + len(obs)
                    continue
                res = env.end(self.states[key], "length")
            if out.finish_reason == "tool":
                engine.release(key)
            job = self.jobs.pop(key)
            del self.states[key], self.turn_start[key]
            out_eps.append(Episode(key, key[0], out, float(res.reward), dict(res.info), job.sample))
        return out_eps

    def restart(self) -> int:
        """Abort every episode in flight and submit it again from its prompt (same seed, the
        engine's current weights): the ``requeue`` answer to new weights. Returns how many."""
        jobs = list(self.jobs.values())
        for key in list(self.jobs):
            self.engine.abort(key)
        self.jobs.clear(), self.states.clear(), self.turn_start.clear()
        for j in jobs:
            self.add(j)
        return len(jobs)

    def abort(self) -> int:
        """Drop every episode in flight (the run is over); returns how many."""
        n = len(self.jobs)
        for key in list(self.jobs):
            self.engine.abort(key)
        self.jobs.clear(), self.states.clear(), self.turn_start.clear()
        return n


def episodes_to_batch(episodes: list[Episode], finish_codes: dict[str, int], pad_id: int = 0) -> TensorDict:
    """The trajectory TensorDict (keys in ``sidpt.batch``), right-padded to the longest episode.
    ``finish_codes`` maps the env's ``info["finish"]`` to the batch's FINISH_REASON codes."""
    return trajectories_to_batch([episode_trajectory(e, finish_codes.get(e.info.get("finish"), FINISH_ERROR))
                                  for e in episodes], pad_id)


def episode_trajectory(e: Episode, finish_code: int) -> Trajectory:
    """An ended episode (key = (group, index)) as one trajectory row."""
    o = e.out
    return Trajectory(e.key[0], e.key[1], list(o.tokens), list(o.generated), list(o.versions), list(o.logprobs),
                      o.prompt_len, finish_code, float(e.reward))
