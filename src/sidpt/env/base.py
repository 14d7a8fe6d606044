"""The environment protocol: episode-level, text-level, multi-turn; the rollout controller drives it.

An environment sees text and returns text. It never sees tokens: the controller tokenizes every
observation itself and appends the ids after the model's turn with ``loss_mask = 0`` (the policy
did not produce them), so one environment serves every tokenizer and engine.

    state = env.reset(sample)                          # one episode per (prompt, sample in group)
    params = SamplingParams(stop_strings=env.stop_strings, ...)
    while True:
        text = <the model's turn, decoded; ends at one of env.stop_strings, EOS, or the length cap>
        res = env.step(state, text)                    # StepResult
        if res.done:
            break                                      # res.reward is the episode's reward
        engine.resume(id, tokenizer.encode(res.observation))
    # the engine stopped for length (or the episode was aborted): res = env.end(state, "length")

The turns are concatenated raw after the prompt, Search-R1 style: the whole trajectory is one
assistant message and observations are *not* wrapped in chat roles (the engine appends their ids
directly after the model's tokens, so training data must look the same).

``Episode`` / ``run_episode`` are the same loop at the text level with a Python policy; tests,
SFT-data builders and demos use it, and ``encode_turns`` turns an episode into ids and a loss mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from sidpt.batch import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, FINISH_TOOL_LIMIT

# How an episode ended (``info["finish"]``) and its code in the batch's FINISH_REASON column:
#   answer      the model gave a final answer (scored)
#   no_action   a turn with neither a tool call nor an answer (reward 0)
#   tool_limit  a tool call after the turn budget was spent (reward 0)
#   length      ended by the controller: the engine hit its token cap (reward 0)
#   error       ended by the controller or ``run_episode`` for any other reason (reward 0)
FINISH_CODES = {
    "answer": FINISH_STOP,
    "no_action": FINISH_STOP,
    "tool_limit": FINISH_TOOL_LIMIT,
    "length": FINISH_LENGTH,
    "error": FINISH_ERROR,
}


@dataclass
class EnvState:
    """One episode's state; the env owns its meaning, the controller only carries it around."""

    sample: Any  # the task row (for the search env: a ``Question``)
    turn: int = 0  # observations returned so far (tool results and corrective messages)
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # running counters, copied into each StepResult


@dataclass
class StepResult:
    observation: str | None  # text to append after the model's turn; None when done
    done: bool
    reward: float  # the episode's reward when done, else 0.0
    info: dict[str, Any]  # counters (n_searches, n_errors, ...), finish, scores; same keys every step


class Env(Protocol):
    stop_strings: tuple[str, ...]
    """Strings that end a model turn (the engine pauses there and hands the turn to ``step``)."""

    def reset(self, sample: Any) -> EnvState: ...

    def step(self, state: EnvState, model_text: str) -> StepResult:
        """Consume one model turn. Never raises on model text, however malformed."""
        ...

    def end(self, state: EnvState, finish: str) -> StepResult:
        """End an episode the env did not end (length cap, abort): reward 0, ``info['finish'] = finish``."""
        ...


@dataclass
class Turn:
    text: str
    generated: bool  # True: the model wrote it (loss_mask 1); False: an observation (loss_mask 0)


@dataclass
class Episode:
    sample: Any
    turns: list[Turn]  # after the prompt: model, observation, model, ..., model
    reward: float
    info: dict[str, Any]


class Task(Protocol):
    """What the controller needs from an environment: its data, its episodes, its statistics.

    An environment is a module with a ``Config`` dataclass (its ``[env]`` keys, validated strictly
    by ``sidpt.config.from_dict``; a ``validate()`` method may check more) and
    ``make_task(cfg, is_main: bool, need_sft: bool) -> Task``. ``make_task`` runs on every rank:
    files are written by the main rank only, and it ends with a barrier when it wrote any.
    ``sidpt.env.load_environment`` finds the module by ``env.name``.

    Samples are the environment's own task rows; the controller reads only ``sample.id`` and
    ``sample.where`` (the file and line it came from, for errors; may be "")."""

    train: list
    """Samples that RL draws its prompts from."""
    heldout: list
    """Samples of the greedy evaluation before and after RL."""
    env: Env
    """The episode protocol (reset / step / end / stop_strings)."""
    eval_columns: tuple[tuple[str, str], ...]
    """(metric name of ``metrics``, column title) of the before/after table, in order."""
    tokenizer_dir: Any
    """Directory where a random-init model's tokenizer, trained on ``tokenizer_texts``, is cached."""

    def prompt(self, sample: Any) -> str:
        """The prompt text of a sample (raw text; with ``task.chat`` the user message)."""
        ...

    def sft_episodes(self, n: int, seed: int) -> list[Episode]:
        """Up to ``n`` ideal trajectories for the SFT warm-start (``Episode.sample`` set), on samples
        outside ``train`` and ``heldout`` where the task has them."""
        ...

    def tokenizer_texts(self) -> tuple[list[str], list[str]]:
        """Texts a random-init model's tokenizer is trained on (everything the model reads or
        writes), and the strings that must be single tokens (tool tags)."""
        ...

    def metrics(self, episodes: list) -> dict[str, tuple[float, float]]:
        """Statistics of finished episodes (``sidpt.rollout.multiturn.Episode``: ``sample``,
        ``reward``, ``info``, ``out``) as name -> (sum, count); the controller sums both over
        ranks and logs sum / count, so a mean over a subset (count < episodes) is exact too."""
        ...

    def example(self, episode: Any, response: str) -> dict[str, Any]:
        """One held-out episode as a JSON-able row of ``examples_*.jsonl`` (``response``: its text)."""
        ...


def run_episode(env: Env, sample: Any, policy: Callable[[list[Turn]], str], max_steps: int = 64) -> Episode:
    """Drive one episode at the text level: ``policy(turns so far) -> the model's next turn``.

    ``max_steps`` is a guard against an env that never ends; the search env ends by itself within
    ``max_turns + 1`` steps."""
    state = env.reset(sample)
    turns: list[Turn] = []
    for _ in range(max_steps):
        text = policy(turns)
        turns.append(Turn(text, True))
        res = env.step(state, text)
        if res.done:
            return Episode(sample, turns, res.reward, res.info)
        turns.append(Turn(res.observation, False))
    res = env.end(state, "error")
    return Episode(sample, turns, res.reward, res.info)


def encode_turns(turns: list[Turn], encode: Callable[[str], list[int]]) -> tuple[list[int], list[bool]]:
    """Token ids of the turns (each encoded on its own, as the engine sees them) and the loss mask.

    Each turn is encoded separately because that is what happens in a rollout: the model's tokens
    are the sampled ones and the observation is tokenized alone before ``engine.resume``."""
    ids: list[int] = []
    mask: list[bool] = []
    for t in turns:
        t_ids = encode(t.text)
        ids += t_ids
        mask += [t.generated] * len(t_ids)
    return ids, mask
