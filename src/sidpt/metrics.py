"""Metrics: per-step JSONL (TensorBoard too when installed), phase timers, a PNG line plot.

The PNG writer is a few lines of zlib: the reward curve of a CPU demo does not justify a plotting
dependency.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path


class Timers:
    """Wall time per phase of the current step: ``with timers("rollout"): ...``; each span also
    goes to ``trace`` (a ``sidpt.telemetry.Trace``) when one is set."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.trace = None

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.times[name] = self.times.get(name, 0.0) + end - t
            if self.trace is not None:
                self.trace.span(name, t, end)

    def add(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        out, self.times = {f"time/{k}": v for k, v in self.times.items()}, {}
        return out


class MetricsLog:
    """Writes one JSON object per step to ``path`` (flushed each line); mirrors to TensorBoard.

    A run writes a file of its own: an existing non-empty ``path`` (an earlier run under the same
    name) is kept, renamed ``<stem>.<n><suffix>`` with the first free n, instead of being appended
    to (two runs in one file read as one) or overwritten (lost)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.rows: list[dict] = []
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                n = 1
                while (old := self.path.with_name(f"{self.path.stem}.{n}{self.path.suffix}")).exists():
                    n += 1
                self.path.rename(old)
            self.file = open(self.path, "w")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, step: int, values: dict[str, float], step_key: str = "step") -> None:
        """One row. ``step_key`` names the row's step axis: "step" for RL steps, "sft_step" for the
        warm-start, so that the two phases' curves never share an axis."""
        row = {step_key: step, **{k: float(v) for k, v in values.items()}}
        self.rows.append(row)
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != step_key:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def write_line_png(path: str | Path, series: dict[str, list[tuple[float, float]]], width: int = 640,
                   height: int = 360) -> None:
    """A line chart of ``{name: [(x, y), ...]}`` (up to 4 series) as an RGB PNG, axes from the data."""
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    img = [[(255, 255, 255)] * width for _ in range(height)]
    pts = [p for s in series.values() for p in s]
    if not pts:
        raise ValueError("nothing to plot")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(min(p[1] for p in pts), 0.0), max(max(p[1] for p in pts), 1e-9)
    pad = 30

    def px(x, y):
        fx = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
        fy = (y - y0) / (y1 - y0) if y1 > y0 else 0.5
        return pad + round(fx * (width - 2 * pad)), height - pad - round(fy * (height - 2 * pad))

    for x in range(pad, width - pad):  # axes
        img[height - pad][x] = (0, 0, 0)
    for y in range(pad, height - pad + 1):
        img[y][pad] = (0, 0, 0)
    for i, pts_ in enumerate(series.values()):
        c = colors[i % len(colors)]
        for (xa, ya), (xb, yb) in zip(pts_, pts_[1:]):
            (ax, ay), (bx, by) = px(xa, ya), px(xb, yb)
            n = max(abs(bx - ax), abs(by - ay), 1)
            for k in range(n + 1):
                x, y = ax + (bx - ax) * k // n, ay + (by - ay) * k // n
                for dy in (0, 1):
                    if 0 <= y + dy < height:
                        img[y + dy][x] = c
    raw = b"".join(b"\x00" + bytes(v for px_ in row for v in px_) for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def reward_figure(curve: list[tuple[float, float]], evals: dict[str, tuple[float, float]] | None = None):
    """A matplotlib figure of the training reward per RL step (and held-out exact match at the
    evaluations, on a second axis): title, labelled axes with units, legend, grid; the y range
    starts below 0 so that a reward of 0 is not drawn on the x-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    x, y = zip(*curve)
    ax.plot(x, y, color="tab:blue", linewidth=1, alpha=0.5, label="mean reward of the step's episodes")
    k = max(1, len(y) // 20)  # a moving average over ~5% of the run
    if len(y) > 2 * k:
        avg = [sum(y[max(0, i - k + 1): i + 1]) / len(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]
        ax.plot(x, avg, color="tab:blue", linewidth=2, label=f"moving average ({k} steps)")
    top = max(max(y), 0.05)
    ax.set_ylim(-0.05 * top, 1.1 * top)
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward (0 to 1)")
    ax.set_title("GRPO training reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        ax2 = ax.twinx()
        ex, ey = zip(*evals.values())
        ax2.plot(ex, ey, "o--", color="tab:red", label="held-out exact match (greedy)")
        ax2.set_ylabel("held-out exact match (%)")
        ax2.set_ylim(-2, max(max(ey) * 1.2, 10))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_reward_curve(path: str | Path, curve: list[tuple[float, float]],
                      evals: dict[str, tuple[float, float]] | None = None) -> str:
    """The reward curve as a PNG (atomic): with matplotlib (``pip install 'sidpt[plot]'``) a
    labelled chart, else the dependency-free line of ``write_line_png``. Returns which was drawn."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig = reward_figure(curve, evals)
    except ImportError:
        write_line_png(tmp, {"reward": curve})
        kind = "plain (no matplotlib: no axes)"
    else:
        import matplotlib.pyplot as plt

        fig.savefig(tmp)
        plt.close(fig)
        kind = "matplotlib"
    os.replace(tmp, path)
    return kind
