"""Golden per-step losses and gradient norms of a fixed-seed colocated run (SFT warm-start, then
GRPO steps that train), recorded before the controller was restructured (issue 15) and to be
reproduced by every later refactor.

float64 (the whole run, model, engine, log-probs and losses in float64): equal to the recorded
values within 1e-9 on any CPU. float32: bit-identical on the CPU that recorded them (named in
golden.json); on another CPU (other SIMD widths round float32 reductions differently) within 1e-3.
Re-record only for a deliberate numerical change: ``python tests/spine/test_golden.py --record``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden.json")
# debug.toml, shorter: 60 SFT steps (the tool format), 4 GRPO steps at lr 1e-3 (F1 reward: steps 0 and 3 train)
OVERRIDES = ["--sft.steps=60", "--run.steps=4", "--rollout.prompts_per_step=8", "--train.lr=1e-3",
             "--task.eval_questions=2", "--run.threads=1",
             "--env.n_entities=40"]
KEYS = {"sft_step": ("sft/loss", "sft/grad_norm"), "step": ("loss/total", "train/grad_norm", "reward/mean")}


def cpu_name() -> str:
    """The CPU model and the SIMD level torch dispatches to (float32 reductions depend on both)."""
    import torch

    name = "unknown"
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def golden_run(out: Path, dtype: str, extra: list[str] = ()) -> dict[str, list[float]]:
    """Run debug.toml with OVERRIDES in ``dtype``; the per-step values of KEYS from metrics.jsonl."""
    args = [sys.executable, "-m", "sidpt", str(ROOT / "configs/debug.toml"), *OVERRIDES, f"--model.dtype={dtype}",
            f"--run.out_dir={out}", f"--env.dir={out / 'task'}", "--run.name=golden", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    series: dict[str, list[float]] = {}
    for line in (out / "golden" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for axis, keys in KEYS.items():
            if axis in row and (axis == "sft_step" or "loss/total" in row):
                for k in keys:
                    series.setdefault(k, []).append(row[k])
    return series


def assert_series(got: dict, want: dict, rel: float, what: str) -> None:
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for k in want:
        assert len(got[k]) == len(want[k]), (what, k, got[k], want[k])
        for i, (a, b) in enumerate(zip(got[k], want[k])):
            ok = a == b if rel == 0 else abs(a - b) <= rel * max(1.0, abs(b))
            assert ok, f"{what}: {k}[{i}] = {a!r}, golden {b!r} (|diff| {abs(a - b):.3g}, allowed {rel:g})"


def test_golden_float64(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = golden_run(tmp_path, "float64")
    assert any(v != 0 for v in got["loss/total"]), "the GRPO steps must train (a nonzero loss)"
    assert_series(got, golden["float64"], 1e-9, "float64")


def test_golden_float32(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    same_cpu = cpu_name() == golden["cpu"] and golden["torch"] == __import__("torch").__version__
    got = golden_run(tmp_path, "float32")
    assert_series(got, golden["float32"], 0.0 if same_cpu else 1e-3, f"float32 ({'bitwise' if same_cpu else '1e-3'})")


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as d:
        out = {"cpu": cpu_name(), "torch": torch.__version__,
               "float64": golden_run(Path(d) / "f64", "float64"), "float32": golden_run(Path(d) / "f32", "float32")}
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
