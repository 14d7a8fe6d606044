"""How fast does a random-init model learn to *read* each attribute of the demo task?

    python tools/reading_probe.py                         # the demo's 1M model, 800 steps
    python tools/reading_probe.py --order reversed        # the same facts, last sentence first
    python tools/reading_probe.py --dim 256 --seed 1

The demo's RL gain is capped by how many of the six attributes the policy can read out of a
search result (docs/architecture.md, "The demo task"). This probe isolates that skill from
search, sampling and RL: supervised steps on SFT-shaped trajectories (``Question: q`` ->
``<search>name</search>`` -> the environment's observation -> ``<answer>``), each about a **fresh**
invented person (names and values recombined from the task's pools, so nothing can be memorised
and every word is in the task vocabulary), loss on the search and the answer's first token. Every
``--every`` steps it prints, per attribute, the teacher-forced argmax accuracy of the answer's
first token on held-out entities' real documents. Chance is about 1/15 (colour) or less.

Measured 2026-11-25 on 2 cores (1M model, lr 3e-3, batch 32, 800 steps in 95 s; table in
docs/architecture.md): each run read at most one attribute well (profession .24; rival 1.00 with
the sentences reversed; rival .86 with seed 1), each appearing in a jump after 400-600 steps;
at dim 256 nothing in 800 steps (3.8x the time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from sidpt.batch import LOSS_MASK, TOKENS
from sidpt.data import sft_batch
from sidpt.env.search.data import prepare_task, task_tokenizer
from sidpt.env.search.bm25 import Doc
from sidpt.env.search.env import ANSWER_OPEN, SEARCH_CLOSE, SEARCH_OPEN, format_docs, wrap_observation
from sidpt.env.search.task import ATTRIBUTES, QUESTION_TEMPLATES, entity_document, make_entities
from sidpt.model import SIZES, build_model


def trajectory(tok, p: dict, attr: str, reverse: bool) -> tuple[list[int], list[bool]]:
    """Ids of one SFT-shaped trajectory and its loss mask; the last id is the answer's first token."""
    text = entity_document(p)["text"]
    if reverse:  # sentences end with ". " and names never hold a period
        text = " ".join(s if s.endswith(".") else s + "." for s in reversed(text.split(". ")))
    prompt = tok.encode(f"Question: {QUESTION_TEMPLATES[attr].format(name=p['name'])}\n{SEARCH_OPEN}")
    search = tok.encode(f"{p['name']}{SEARCH_CLOSE}")
    obs = tok.encode(wrap_observation(format_docs([(Doc(p["doc_id"], p["name"], text), 0.0)])) + ANSWER_OPEN)
    answer = tok.encode(p[attr])[:1]
    return prompt + search + obs + answer, [False] * len(prompt) + [True] * len(search) + [False] * len(obs) + [True]


def padded(rows: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and [B, T] float loss weights, right-padded (the SFT batch layout)."""
    batch = sft_batch(rows, pad_id=0)
    return batch[TOKENS], batch[LOSS_MASK].float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task-dir", default="runs/task-demo", help="generated with the demo recipe's task arguments")
    ap.add_argument("--n-entities", type=int, default=2000)
    ap.add_argument("--name-pool", type=int, default=250)
    ap.add_argument("--sft-frac", type=float, default=0.2)
    ap.add_argument("--size", default="1M")
    ap.add_argument("--dim", type=int, default=0, help="override the size's width (0: keep)")
    ap.add_argument("--heads", type=int, default=0, help="override the size's heads, kv heads too (0: keep)")
    ap.add_argument("--order", choices=("forward", "reversed"), default="forward")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval", type=int, default=300, help="held-out questions per evaluation")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    task = prepare_task(a.task_dir, a.n_entities, 0, True, a.sft_frac, a.name_pool)
    tok = task_tokenizer(task, 0, True, "word")
    people = make_entities(a.n_entities, 0, a.name_pool)  # the corpus's people
    by_id = {p["doc_id"]: p for p in people}
    held = [json.loads(line) for line in Path(task["heldout"]).read_text().splitlines()][: a.eval]
    evalset = [(by_id[h["doc_id"]], h["attribute"]) for h in held]
    firsts = sorted({p["name"].split()[0] for p in people})
    lasts = sorted({p["name"].split()[1] for p in people})
    rev = a.order == "reversed"

    def fresh(rng: random.Random) -> dict:
        p = {k: rng.choice(people)[k] for k in ATTRIBUTES}
        return {"doc_id": "fresh", "name": f"{rng.choice(firsts)} {rng.choice(lasts)}", **p}

    args = SIZES[a.size]
    over = {"vocab_size": tok.vocab_size}
    if a.dim:
        over |= {"dim": a.dim, "intermediate_size": 8 * a.dim // 3 // 16 * 16}
    if a.heads:
        over |= {"n_heads": a.heads, "n_kv_heads": a.heads}
    model = build_model(dataclasses.replace(args, **over), seed=a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, betas=(0.9, 0.95))

    @torch.no_grad()
    def accuracy() -> dict[str, float]:
        model.eval()
        hits = {k: [0, 0] for k in ATTRIBUTES}
        for i in range(0, len(evalset), 50):
            part = evalset[i: i + 50]
            rows = [trajectory(tok, p, k, rev) for p, k in part]
            ids, _ = padded(rows)
            logits = model(ids)  # [B, T, V]
            for b, ((p, k), (r, _)) in enumerate(zip(part, rows)):
                hits[k][0] += int(logits[b, len(r) - 2].argmax()) == r[-1]
                hits[k][1] += 1
        model.train()
        return {k: h / max(1, n) for k, (h, n) in hits.items()}

    console = Console()
    table = Table(title=f"held-out first-token accuracy by attribute ({a.size}, dim {a.dim or args.dim}, "
                        f"heads {a.heads or args.n_heads}, order {a.order}, lr {a.lr})")
    short = {"birthplace": "place", "birth_year": "year", "profession": "job", "employer": "firm"}
    for col in ("step", "s", "loss", *(short.get(k, k) for k in ATTRIBUTES), "all"):
        table.add_column(col, justify="right")
    rng, t0, loss = random.Random(a.seed), time.perf_counter(), float("nan")
    for step in range(a.steps + 1):
        if step % a.every == 0:
            acc = accuracy()
            table.add_row(str(step), f"{time.perf_counter() - t0:.0f}", f"{loss:.3f}",
                          *(f"{acc[k]:.2f}" for k in ATTRIBUTES), f"{sum(acc.values()) / len(acc):.3f}")
            console.print(f"step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        if step == a.steps:
            break
        ids, w = padded([trajectory(tok, fresh(rng), rng.choice(ATTRIBUTES), rev) for _ in range(a.batch)])
        logits = model(ids[:, :-1])  # [B, T-1, V]
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")  # [B*(T-1)]
        loss_t = (nll * w[:, 1:].flatten()).sum() / w[:, 1:].sum()
        opt.zero_grad()
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = loss_t.item()
    console.print(table)


if __name__ == "__main__":
    main()
