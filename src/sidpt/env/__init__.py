"""Environments: the text-level multi-turn protocol (``base``) and the tasks built on it.

- ``base``: ``Env`` (``reset`` / ``step`` / ``end`` / ``stop_strings``, text in, text out),
  ``Task`` (what the controller needs from an environment: samples, prompts, SFT trajectories,
  tokenizer texts, ``metrics(episodes)``, the table's columns), ``run_episode`` and
  ``encode_turns``.
- ``search/``: multi-turn BM25 search over a corpus (``<search>`` / ``<information>`` /
  ``<answer>``), its fictional-entity task generator and SFT trajectories, EM / F1 / retrieval
  statistics.
- ``arith``: single-turn integer arithmetic with a programmatic reward (the second environment).
- ``echo``: copy a string of long-tailed length (the async pipeline's task: p90 / p10 response length >= 8).

``[env] name`` chooses the environment: a name in ``ENVIRONMENTS`` or the dotted path of your
own module (a ``Config`` dataclass and ``make_task``, see ``base.Task``). ``task.reward =
"module:function"`` replaces any environment's reward with your function.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Callable

from sidpt.env.guard import Guard, guarded_reward
from sidpt.errors import ConfigError

ENVIRONMENTS = {"search": "sidpt.env.search", "arith": "sidpt.env.arith", "echo": "sidpt.env.echo"}


def load_environment(table: dict[str, Any]) -> tuple[ModuleType, Any]:
    """The environment module named by ``table["name"]`` and its ``Config`` built from the rest of
    ``table`` (strictly: an unknown key or a wrong type names ``env.<key>``)."""
    from sidpt.config import from_dict  # config.py is a leaf: it imports no environment

    rest = dict(table)
    name = rest.pop("name", "search")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"env.name={name!r}: expected one of {list(ENVIRONMENTS)} or a module path")
    path = ENVIRONMENTS.get(name, name)
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ConfigError(f"env.name={name!r}: not one of {list(ENVIRONMENTS)}, and no module {path!r} can be "
                          f"imported ({e})") from None
    for attr in ("Config", "make_task"):
        if not hasattr(module, attr):
            raise ConfigError(f"env.name={name!r}: module {path!r} has no {attr} (an environment defines a Config "
                              f"dataclass and make_task; see sidpt.env.base.Task)")
    return module, from_dict(module.Config, rest, "env.")


def env_table(name: str, cfg: Any) -> dict[str, Any]:
    """The resolved ``[env]`` table (every key, defaults filled in) that is saved with the run."""
    return {"name": name, **dataclasses.asdict(cfg)}


def load_reward(spec: str) -> Callable[[Any, str, dict], float] | None:
    """``task.reward = "module:function"``: ``function(sample, response_text, info) -> float`` becomes
    every episode's reward (verl's custom reward function); empty: the environment's own."""
    if not spec:
        return None
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ConfigError(f"task.reward={spec!r}: expected 'module:function' (e.g. 'my_rewards:score')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"task.reward={spec!r}: cannot import module {module_name!r} ({e}); is it on "
                          f"PYTHONPATH?") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"task.reward={spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def score(episodes: list, reward_fn, decode, guard: Guard | None = None) -> list:
    """The reward stage: with your ``task.reward`` function, each finished episode's reward is
    ``reward_fn(sample, response_text, info)`` (its response: everything after the prompt, tool
    observations included, as text); without one the environment's reward stands. A function that
    raises, hangs or returns a non-finite value is a fault (``sidpt.env.guard``: reward 0, counted,
    logged; without a ``guard``, or with ``task.faults = "error"``, an error naming the sample)."""
    if reward_fn is None:
        return episodes
    guard = guard or Guard()
    for e in episodes:
        if "fault" not in e.info:  # an episode whose environment failed keeps its reward 0
            guarded_reward(guard, reward_fn, e, decode(e.out.tokens[e.out.prompt_len:]))
    return episodes
