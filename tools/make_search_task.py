"""Write a synthetic search task: invented people, a corpus about them, entity-disjoint question splits.

    python tools/make_search_task.py --out runs/task --n-entities 1000 --seed 0

Writes corpus.jsonl, train.jsonl, heldout.jsonl (questions about entities no train question
mentions), sft.jsonl (questions about a third disjoint set, for the SFT warm-start) and task.json;
the BM25 index is cached on first use as corpus.jsonl.bm25.json. Deterministic for a seed. See
``sidpt.env.search.task`` for the layout.
"""

from __future__ import annotations

import argparse
import json

from sidpt.env.search.task import make_search_task


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--n-entities", type=int, default=1000, help="invented people, one document each")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    ap.add_argument("--heldout-frac", type=float, default=0.2, help="share of entities for heldout.jsonl")
    ap.add_argument("--sft-frac", type=float, default=0.1, help="share of entities for sft.jsonl")
    args = ap.parse_args(argv)
    try:
        paths = make_search_task(args.out, args.n_entities, args.seed, args.heldout_frac, args.sft_frac)
    except ValueError as e:
        ap.error(str(e))
    meta = json.loads(paths["task"].read_text())
    for name in ("corpus", "train", "heldout", "sft"):
        n = sum(1 for _ in open(paths[name], encoding="utf-8"))
        print(f"{name:8s} {n:6d} rows  {paths[name]}")
    print(f"entities: train {meta['n_train_entities']}, heldout {meta['n_heldout_entities']}, "
          f"sft {meta['n_sft_entities']}")


if __name__ == "__main__":
    main()
