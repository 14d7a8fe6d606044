"""Export a training checkpoint's policy as an HF checkpoint (config.json, safetensors, tokenizer).

    python tools/export_checkpoint.py runs/debug                 # the run's newest complete checkpoint
    python tools/export_checkpoint.py runs/debug/checkpoints/step_000006 --out exported/

The result loads with ``--model.path=<out>`` and with transformers' ``from_pretrained``. An
incomplete or corrupted checkpoint is named and skipped (a run directory) or refused (a path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sidpt.checkpoint import MANIFEST, export_hf, newest_checkpoint
from sidpt.model import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, help="a run directory (its newest complete checkpoint) or one checkpoint")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: <run dir>/hf_step_<n>)")
    a = ap.parse_args(argv)
    ckpt = a.path if (a.path / MANIFEST).exists() or a.path.name.startswith("step_") else newest_checkpoint(a.path, print)
    if ckpt is None:
        print(f"{a.path}: no complete checkpoint under {a.path / 'checkpoints'}", file=sys.stderr)
        return 1
    out = a.out or ckpt.parent.parent / f"hf_{ckpt.name}"
    try:
        export_hf(ckpt, out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {ckpt} -> {out} (--model.path={out} loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
