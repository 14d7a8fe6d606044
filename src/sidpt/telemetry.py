"""Telemetry: a pynvml sampler of the rank's GPU, and a Chrome-trace/Perfetto timeline of phases.

``GpuSampler`` (a GPU with pynvml installed, ``run.telemetry_s`` > 0): a daemon thread reads the
rank's GPU every interval (utilisation, memory used, power, SM clock); ``pop`` aggregates what
it read since the last call into the step's ``gpu/*`` metrics (means; memory: the max) and the
samples become counter tracks of the timeline. On a CPU there is nothing to sample.

``Trace``: phase spans (``Timers`` and the async rollout's laps) of the steps in
``run.trace_steps``, per rank, on one wall-clock axis (each rank's ``perf_counter`` shifted by
its offset to ``time.time()`` at start-up, so ranks on several nodes line up to NTP accuracy);
the main rank writes every rank's spans as ``trace.json`` in the Trace Event Format
(ui.perfetto.dev and chrome://tracing open it): one process per rank, named by its roles.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from sidpt.files import atomic_write


class GpuSampler:
    """pynvml readings of one GPU on a thread; ``start`` returns None where there is none."""

    FIELDS = ("util_pct", "mem_gib", "power_w", "sm_clock_mhz")

    def __init__(self, nvml, handle, interval_s: float, trace: Trace | None = None):
        self.nvml, self.handle, self.interval_s, self.trace = nvml, handle, interval_s, trace
        self.samples: list[tuple[float, ...]] = []  # (t, util, mem, power, clock), since the last pop
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sidpt-nvml", daemon=True)
        self.thread.start()

    @staticmethod
    def start(device, interval_s: float, trace: Trace | None = None) -> GpuSampler | None:
        """A sampler of ``device`` (a CUDA device), or None: a CPU, ``interval_s`` = 0, or no
        pynvml (``pip install 'sidpt[gpu]'``) or driver."""
        if getattr(device, "type", "cpu") != "cuda" or interval_s <= 0:
            return None
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(device.index or 0))
        except pynvml.NVMLError:
            return None
        return GpuSampler(pynvml, handle, interval_s, trace)

    def read(self) -> tuple[float, ...]:
        nv, h = self.nvml, self.handle
        return (time.perf_counter(), float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                nv.nvmlDeviceGetMemoryInfo(h).used / 2**30, nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                s = self.read()
            except self.nvml.NVMLError:  # a transient driver error: that sample is missing, not the run
                continue
            with self.lock:
                self.samples.append(s)
            if self.trace is not None:
                self.trace.counters("gpu", s[0], dict(zip(self.FIELDS, s[1:])))

    def pop(self) -> dict[str, float]:
        """The step's ``gpu/*``: the means of utilisation, power and SM clock, the max of memory."""
        with self.lock:
            got, self.samples = self.samples, []
        if not got:
            return {}
        cols = list(zip(*got))[1:]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"gpu/util_pct": mean(cols[0]), "gpu/mem_gib_max": max(cols[1]), "gpu/power_w": mean(cols[2]),
                "gpu/sm_clock_mhz": mean(cols[3]), "gpu/samples": float(len(got))}

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5 * self.interval_s + 1)


def _physical_index(index: int) -> int:
    """The NVML index of CUDA device ``index`` (CUDA_VISIBLE_DEVICES renumbers the devices)."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [x.strip() for x in visible.split(",") if x.strip()]
    return int(ids[index]) if index < len(ids) and ids[index].isdigit() else index


def parse_steps(spec: str) -> range:
    """``run.trace_steps``: "a:b" is steps a..b-1, "a" the one step; "" none."""
    if not spec:
        return range(0)
    a, _, b = spec.partition(":")
    lo = int(a)
    return range(lo, int(b) if b else lo + 1)


class Trace:
    """Phase spans of one rank for the traced steps (``active``), in microseconds of wall clock."""

    def __init__(self, rank: int, steps: range):
        self.rank, self.steps, self.active = rank, steps, False
        self.offset = time.time() - time.perf_counter()  # perf_counter -> wall clock, per rank
        self.events: list[dict] = []
        self.lock = threading.Lock()  # the sampler's thread adds counters

    def at(self, step: int) -> None:
        """Trace the spans from now on when ``step`` is a traced step."""
        self.active = step in self.steps

    def span(self, name: str, t0: float, t1: float, step: int | None = None) -> None:
        """A complete event ("X") from perf_counter ``t0`` to ``t1``, when active."""
        if self.active:
            ev = {"name": name, "ph": "X", "pid": self.rank, "tid": 0, "ts": (t0 + self.offset) * 1e6,
                  "dur": max(t1 - t0, 0.0) * 1e6, "cat": "phase"}
            if step is not None:
                ev["args"] = {"step": step}
            with self.lock:
                self.events.append(ev)

    def counters(self, name: str, t: float, values: dict[str, float]) -> None:
        if self.active:
            with self.lock:
                self.events.append({"name": name, "ph": "C", "pid": self.rank, "ts": (t + self.offset) * 1e6,
                                    "args": values})


def write_trace(path: Path, events: list[dict], names: dict[int, str]) -> int:
    """Every rank's events as one Trace Event Format file (atomic); ``names``: rank -> label.
    Returns the number of events."""
    meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": label}} for rank, label in names.items()]
    meta += [{"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}} for rank in names]
    atomic_write(path, json.dumps({"traceEvents": meta + sorted(events, key=lambda e: e["ts"]),
                                   "displayTimeUnit": "ms"}))
    return len(events)
