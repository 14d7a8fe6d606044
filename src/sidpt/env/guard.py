"""Fault isolation for environment and reward calls (``task.faults``, ``task.call_timeout_s``).

An environment step or a reward function is user code that talks to the outside world (a
retriever, a sandbox, a grader): at scale some calls raise and some never return. One such call
must cost one episode, not the run. ``Guard.call`` runs a call on a worker thread and waits at
most ``timeout_s``; a call that raises, times out or (a reward) returns a non-finite value is a
*fault*: the episode ends with ``info["finish"] = "error"`` and reward 0, ``info["fault"]`` names
what failed, and the fault is written with its sample to ``faults_rank<r>.jsonl`` in the run
directory. The step's row counts them (``rollout/faults``). ``mode = "error"`` stops the run
instead, naming the sample (for debugging an environment).

A timed-out call cannot be killed (Python has no thread cancellation): its worker thread is
abandoned, and a fresh one serves the next call. An abandoned call that ever returns is ignored.
The environment state of a faulted episode is dropped, never reused.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape

from sidpt.env.base import EnvState, StepResult
from sidpt.errors import ConfigError


class Fault(Exception):
    """A guarded call that raised, timed out or returned a non-finite reward."""


class _Worker:
    """One daemon thread running calls in order."""

    def __init__(self):
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, daemon=True, name="sidpt-env-call").start()

    def _loop(self) -> None:
        while True:
            fn, args = self.todo.get()
            try:
                self.done.put((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - the caller decides what a failure means
                self.done.put((False, e))


class Guard:
    """Runs environment and reward calls isolated (module docstring). ``timeout_s = 0``: no
    timeout, calls run on the caller's thread (exceptions are still isolated)."""

    def __init__(self, mode: str = "error", timeout_s: float = 0.0, log_path: Path | None = None,
                 report: Callable[[str], None] | None = None):
        self.mode, self.timeout_s, self.log_path, self.report = mode, timeout_s, log_path, report
        self.count = 0  # faults so far
        self.seconds = 0.0  # time in guarded calls so far, faulted ones included (the waterfall's "environment")
        self.trace = None  # where each call's span goes, when set
        self._worker: _Worker | None = None

    def call(self, what: str, sample: Any, fn: Callable, *args) -> Any:
        """``fn(*args)``, or ``Fault`` (already logged) when it raises or outlives the timeout;
        ``mode = "error"``: a ConfigError naming ``what`` and the sample."""
        t0 = time.perf_counter()
        try:
            return self._run(fn, args)
        except Fault as e:
            raise self.fault(what, sample, str(e), args, time.perf_counter() - t0) from None
        except Exception as e:  # noqa: BLE001 - user code
            raise self.fault(what, sample, f"{type(e).__name__}: {e}", args, time.perf_counter() - t0) from e
        finally:
            self.seconds += time.perf_counter() - t0
            if self.trace is not None:  # a span of the timeline (sidpt.telemetry.Trace)
                self.trace.span(what, t0, time.perf_counter())

    def _run(self, fn: Callable, args: tuple) -> Any:
        if self.timeout_s <= 0:
            return fn(*args)
        if self._worker is None:
            self._worker = _Worker()
        self._worker.todo.put((fn, args))
        try:
            ok, value = self._worker.done.get(timeout=self.timeout_s)
        except queue.Empty:
            self._worker = None  # stuck: abandoned, the next call gets a fresh thread
            raise Fault(f"TimeoutError: no answer within task.call_timeout_s={self.timeout_s:g}") from None
        if not ok:
            raise value
        return value

    def fault(self, what: str, sample: Any, error: str, args: tuple = (), held_s: float = 0.0) -> Exception:
        """Count and log one fault (``held_s``: how long the call held the caller); returns the
        exception to raise (``Fault``, or ConfigError in ``mode = "error"``)."""
        sid = getattr(sample, "id", None)
        name = repr(sid) if sid is not None else repr(sample)[:200]
        if self.mode == "error":
            return ConfigError(f"{what} failed on sample {name}: {error} (task.faults='isolate' ends such an "
                               f"episode with reward 0 and counts it instead)")
        self.count += 1
        text = next((a for a in args if isinstance(a, str)), None)
        if self.log_path is not None:
            row = {"fault": what, "error": error, "sample": str(sid) if sid is not None else repr(sample)[:500],
                   "held_s": round(held_s, 4),
                   **({"text": text[-2000:]} if text is not None else {})}
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        if self.report is not None and self.count <= 3:
            more = " (further faults: counted in rollout/faults, logged only)" if self.count == 3 else ""
            where = f" -> {self.log_path}" if self.log_path is not None else ""
            self.report(f"[yellow]fault isolated: {escape(f'{what} on sample {name}: {error}')}; reward 0{where}{more}[/]")
        return Fault(error)


class _Faulted(EnvState):
    """The state of an episode whose environment failed: it ends at its next step."""


class GuardedEnv:
    """An environment whose ``reset`` / ``step`` / ``end`` go through a ``Guard``: a failed call
    ends the episode (finish "error", reward 0, ``info["fault"]``) instead of the run."""

    def __init__(self, env, guard: Guard):
        self.env, self.guard, self.stop_strings = env, guard, tuple(env.stop_strings)

    def reset(self, sample: Any) -> EnvState:
        try:
            return self.guard.call("env.reset", sample, self.env.reset, sample)
        except Fault as e:
            return _Faulted(sample, done=True, info={"finish": "error", "fault": f"env.reset: {e}"})

    def step(self, state: EnvState, model_text: str) -> StepResult:
        return self._ended("env.step", self.env.step, state, model_text)

    def end(self, state: EnvState, finish: str) -> StepResult:
        return self._ended("env.end", self.env.end, state, finish)

    def _ended(self, what: str, fn, state: EnvState, arg: str) -> StepResult:
        """``fn(state, arg)`` guarded; a faulted episode (its reset or this call) ends with reward 0."""
        if isinstance(state, _Faulted):
            return StepResult(None, True, 0.0, dict(state.info))
        try:
            return self.guard.call(what, state.sample, fn, state, arg)
        except Fault as e:
            return StepResult(None, True, 0.0, {**state.info, "finish": "error", "fault": f"{what}: {e}"})

    def __getattr__(self, name: str) -> Any:  # anything else an environment offers (tests, demos)
        return getattr(self.env, name)


def guarded_reward(guard: Guard, reward_fn: Callable, e, response: str) -> None:
    """``e.reward = reward_fn(sample, response, info)``; a failure or a non-finite value is a fault
    (reward 0, ``e.info["fault"]``)."""
    what = f"task.reward={getattr(reward_fn, '__module__', '?') + ':' + getattr(reward_fn, '__name__', '?')!r}"
    try:
        r = guard.call(what, e.sample, lambda *a: float(reward_fn(*a)), e.sample, response, dict(e.info))
        if not math.isfinite(r):
            raise guard.fault(what, e.sample, f"returned {r}", (response,))
        e.reward = r
    except Fault as err:
        e.reward = 0.0
        e.info["fault"] = f"{what}: {err}"
