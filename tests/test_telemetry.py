"""Telemetry (sidpt.telemetry): the pynvml sampler's aggregation, driven by a stand-in NVML
module (the real one reads a GPU; this CPU has none), the trace's wall-clock spans and its file,
and the config's step range."""

import json
import sys
import time
import types
from types import SimpleNamespace

import pytest

from sidpt.config import Config, ConfigError
from sidpt.telemetry import GpuSampler, Trace, parse_steps, write_trace


def fake_nvml(readings):
    """A pynvml stand-in whose device reads the next of ``readings`` (util, MiB, mW, MHz) per call."""
    it = iter(readings)
    cur = {}

    def util(h):
        cur.update(zip(("util", "mem", "power", "clock"), next(it)))
        return SimpleNamespace(gpu=cur["util"])

    m = types.ModuleType("pynvml")
    m.NVMLError = type("NVMLError", (Exception,), {})
    m.NVML_CLOCK_SM = 1
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    m.nvmlDeviceGetUtilizationRates = util
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=cur["mem"] * 2**20)
    m.nvmlDeviceGetPowerUsage = lambda h: cur["power"]
    m.nvmlDeviceGetClockInfo = lambda h, kind: cur["clock"] if kind == 1 else -1
    return m


def test_gpu_sampler_aggregates_its_readings(monkeypatch):
    readings = [(40, 1024, 200_000, 1500), (60, 3072, 300_000, 1700), (80, 2048, 400_000, 1980)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(readings + [(0, 0, 0, 0)] * 1000))
    trace = Trace(0, range(1))
    trace.at(0)
    s = GpuSampler.start(SimpleNamespace(type="cuda", index=0), interval_s=3600.0, trace=trace)  # no thread ticks
    assert s is not None and s.handle == ("handle", 0)
    for _ in readings:
        s.samples.append(s.read())
    got = s.pop()
    assert got == {"gpu/util_pct": 60.0, "gpu/mem_gib_max": 3.0, "gpu/power_w": 300.0, "gpu/sm_clock_mhz": pytest.approx(1726.6666666666667),
                   "gpu/samples": 3.0}
    assert s.pop() == {}  # since the last pop: nothing
    s.close()
    t = GpuSampler.start(SimpleNamespace(type="cuda", index=0), interval_s=0.01, trace=trace)
    time.sleep(0.2)
    t.close()
    assert t.pop()["gpu/samples"] >= 3 and any(e["ph"] == "C" and e["name"] == "gpu" for e in trace.events)


def test_no_sampler_without_a_gpu_or_pynvml(monkeypatch):
    assert GpuSampler.start(SimpleNamespace(type="cpu", index=None), 0.5) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert GpuSampler.start(SimpleNamespace(type="cuda", index=0), 0.5) is None
    broken = fake_nvml([])
    broken.nvmlInit = lambda: (_ for _ in ()).throw(broken.NVMLError("no driver"))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert GpuSampler.start(SimpleNamespace(type="cuda", index=0), 0.5) is None


def test_trace_spans_are_wall_clock_microseconds_of_the_traced_steps(tmp_path):
    tr = Trace(3, parse_steps("2:4"))
    t0 = time.perf_counter()
    for step in range(5):
        tr.at(step)
        tr.span("train", t0 + step, t0 + step + 0.25, step)
    assert [e["args"]["step"] for e in tr.events] == [2, 3]
    wall = time.time() - time.perf_counter() + t0  # t0 on the wall clock
    assert tr.events[0]["ts"] == pytest.approx((wall + 2) * 1e6, abs=2e3) and tr.events[0]["dur"] == pytest.approx(2.5e5)
    n = write_trace(tmp_path / "trace.json", tr.events, {3: "rank 3 (trainer)"})
    data = json.loads((tmp_path / "trace.json").read_text())
    assert n == 2 and data["traceEvents"][0] == {"name": "process_name", "ph": "M", "pid": 3,
                                                 "args": {"name": "rank 3 (trainer)"}}
    assert [e["ts"] for e in data["traceEvents"] if e["ph"] == "X"] == sorted(e["ts"] for e in tr.events)


def test_trace_steps_config():
    assert list(parse_steps("")) == [] and list(parse_steps("3")) == [3] and list(parse_steps("1:4")) == [1, 2, 3]
    for bad in ("4:2", "a:b", "1:", "-1:3", "1:2:3"):
        cfg = Config()
        cfg.run.trace_steps = bad
        with pytest.raises(ConfigError, match="run.trace_steps"):
            cfg.validate()
    cfg = Config()
    cfg.run.telemetry_s = -0.5
    with pytest.raises(ConfigError, match=r"run.telemetry_s=-0.5: must be >= 0"):
        cfg.validate()
