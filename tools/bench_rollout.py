"""Rollout throughput: sidpt's native engine vs transformers' ``generate``, against the roofline.

    python tools/bench_rollout.py                       # 6M / 25M / 100M at batch 1, 16, 64
    python tools/bench_rollout.py --sizes 25M --batches 64 --new-tokens 64
    python tools/bench_rollout.py --sizes 25M --batches 16 64 --new-tokens 64 --sample   # the RL setting
    python tools/bench_rollout.py --sizes runs/smollm2    # a checkpoint directory (a real model)
    python tools/bench_rollout.py --thrash                # scheduling under KV-cache pressure
    python tools/bench_rollout.py --exact --sizes 1M 25M --batches 16 64 --new-tokens 64
                                                          # numerics=exact vs default, side by side

Same weights (random, saved by sidpt and loaded by transformers; or a checkpoint directory that
both load, e.g. SmolLM2-135M-Instruct from ``tools/import_gguf.py --smollm2``), same prompts (16
random tokens each), greedy (or ``--sample``: temperature 1, no top-k / top-p, both), ``--new-tokens`` new tokens per prompt, fp32, 2 threads.

Roofline. Both rates are measured at start-up in this run: the matmul rate F (best of a few
1024^3 fp32 GEMMs) and the copy bandwidth W (bytes read + written per second by a 256 MiB
``copy_``). A decode step over B sequences of context l costs

    FLOPs = 2 * B * (non-embedding params + LM head) + 4 * B * n_layers * n_heads * head_dim * l
    bytes = weight bytes (non-embedding + LM head) + B * l * (KV bytes per token)

and is allowed max(FLOPs / F, bytes / W) seconds; the prefill of the prompts is charged the same
way. The roofline time of a run is the sum over its steps; "% roofline" is that time over the
measured wall time (higher is better, 100% is the bound).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from sidpt.model import SIZES, build_model, load_checkpoint, save_checkpoint
from sidpt.flops import measure_peaks
from sidpt.model.model import ModelArgs
from sidpt.rollout import Engine, EngineConfig, Request, SamplingParams


def roofline_seconds(args: ModelArgs, B: int, prompt: int, new: int, F: float, W: float) -> float:
    """Sum over the prefill and every decode step of max(FLOPs / F, bytes / W), fp32."""
    head = args.vocab_size * args.dim
    body = args.num_params(embeddings=False)
    weights = 4 * (body + head)
    kv_tok = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4
    attn_flops_per_key = 4 * args.n_layers * args.n_heads * args.head_dim

    def step(n_tokens: int, context: int) -> float:
        flops = 2 * n_tokens * body + 2 * B * head + n_tokens * attn_flops_per_key * context
        nbytes = weights + B * context * kv_tok
        return max(flops / F, nbytes / W)

    total = step(B * prompt, prompt // 2)  # prefill: each token sees on average half the prompt
    for i in range(1, new):  # the first new token comes out of the prefill
        total += step(B, prompt + i)
    return total


def bench_sidpt(model, prompts, new: int, repeats: int, sample: bool = False) -> float:
    cfg = EngineConfig(block_size=16, kv_cache_mb=2048, max_model_len=len(prompts[0]) + new + 16,
                       max_seqs=max(8, len(prompts)), max_prefill_tokens=8192)
    engine = Engine(model, cfg)
    temp = 1.0 if sample else 0.0
    engine.generate([Request(f"w{i}", p, SamplingParams(temperature=temp, max_new_tokens=4))
                     for i, p in enumerate(prompts)])
    best = float("inf")
    for r in range(repeats):
        reqs = [Request(f"{r}-{i}", p, SamplingParams(temperature=temp, max_new_tokens=new, seed=r * len(prompts) + i))
                for i, p in enumerate(prompts)]
        t = time.perf_counter()
        outs = engine.generate(reqs)
        best = min(best, time.perf_counter() - t)
        assert all(len(o.tokens) == len(p) + new for o, p in zip(outs, prompts))
    return best


def bench_hf(path, prompts, new: int, repeats: int, sample: bool = False) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    # sampled: the RL setting, the full distribution (transformers' default top_k=50 switched off)
    how = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **how)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            best = min(best, time.perf_counter() - t)
    assert out.shape == (len(prompts), len(prompts[0]) + new)
    return best


def bench_thrash(console: Console, size: str = "6M", n: int = 64, prompt: int = 200, new: int = 40) -> None:
    """Continuous batching with a KV cache that holds a third of the demand vs an unconstrained
    one: wall time, preemptions and prefill tokens (recomputation shows up as prefill > ideal)."""
    from sidpt.rollout.kv_cache import PagedKVCache

    args = SIZES[size]
    model = build_model(args, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab_size, (prompt + (i % 7) * 10,), generator=g).tolist() for i in range(n)]
    ideal = sum(map(len, prompts))
    demand = sum(len(p) + new for p in prompts)
    per_token = PagedKVCache.bytes_per_token(args.n_layers, args.n_kv_heads, args.head_dim, torch.float32)
    table = Table(title=f"{size}, {n} requests, prompt ~{prompt}, {new} sampled tokens each")
    for col in ("KV cache", "seconds", "time / unconstrained", "preemptions", "prefill / ideal", "steps"):
        table.add_column(col, justify="right")
    base = None
    for frac in (4.0, 1 / 3):
        mb = frac * demand * per_token / 2**20
        engine = Engine(model, EngineConfig(block_size=16, kv_cache_mb=mb, max_model_len=prompt + new + 96,
                                            max_seqs=n))
        reqs = [Request(i, p, SamplingParams(temperature=1.0, max_new_tokens=new, seed=i)) for i, p in enumerate(prompts)]
        t = time.perf_counter()
        engine.generate(reqs)
        dt = time.perf_counter() - t
        base = base or dt
        st = engine.stats
        table.add_row(f"{frac:.2f} x demand", f"{dt:.2f}", f"{dt / base:.2f}x", str(st["preemptions"]),
                      f"{st['prefill_tokens'] / ideal:.2f}", str(st["steps"]))
    console.print(table)


def bench_exact(console: Console, sizes: list[str], batches: list[int], new: int, prompt: int, rounds: int) -> None:
    """The engine in numerics="exact" (batch-invariant, sidpt.model.numerics) against the default
    engine on the same weights and prompts, sampled (T = 1, the RL setting): ``rounds`` runs of
    each, alternating and the order flipped every round; best and median tokens/s."""
    table = Table(title=f"engine, numerics exact vs default: sampled decode, prompt {prompt}, {new} new tokens, "
                        f"fp32, {torch.get_num_threads()} threads, {rounds} alternating rounds (tokens/s)")
    for col in ("model", "batch", "default best", "exact best", "exact cost (best)", "default median",
                "exact median", "exact cost (median)"):
        table.add_column(col, justify="right")
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        args = SIZES[size]
        for B in batches:
            prompts = torch.randint(0, args.vocab_size, (B, prompt), generator=g).tolist()
            models = {m: build_model(args, seed=0).set_numerics(m) for m in ("default", "exact")}
            times = {m: [] for m in models}
            for r in range(rounds):
                for m in (("default", "exact") if r % 2 == 0 else ("exact", "default")):
                    times[m].append(bench_sidpt(models[m], prompts, new, 1, sample=True))
            n = B * new
            best = {m: min(t) for m, t in times.items()}
            med = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
            table.add_row(size, str(B), f"{n / best['default']:.0f}", f"{n / best['exact']:.0f}",
                          f"{best['exact'] / best['default']:.2f}x", f"{n / med['default']:.0f}",
                          f"{n / med['exact']:.0f}", f"{med['exact'] / med['default']:.2f}x")
            console.print(f"  {size} batch {B}: default {[round(t, 3) for t in times['default']]}, "
                          f"exact {[round(t, 3) for t in times['exact']]} s")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["6M", "25M", "100M"],
                    help=f"named sizes ({', '.join(SIZES)}) or checkpoint directories")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (sidpt only)")
    ap.add_argument("--sample", action="store_true",
                    help="sampled decode (temperature 1, top-k 0, top-p 1: the RL setting) instead of greedy")
    ap.add_argument("--thrash", action="store_true", help="only the KV-cache pressure scheduling benchmark")
    ap.add_argument("--exact", action="store_true", help="only numerics=exact vs default (sidpt's engine)")
    ap.add_argument("--rounds", type=int, default=6, help="--exact: alternating rounds")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    console = Console(width=150)  # piped output: no truncated columns
    if a.thrash:
        return bench_thrash(console)
    if a.exact:
        return bench_exact(console, a.sizes, a.batches, a.new_tokens, a.prompt_len, a.rounds)
    load = os.getloadavg()[0]
    if load > 0.5:
        console.print(f"[yellow]load average {load:.2f}: another process is busy, timings will be low[/]")
    peaks = measure_peaks(repeats=5, copy_mb=256)  # this CPU now: fp32 GEMM and copy (as every run, longer)
    F, W = peaks.flops, peaks.bytes
    console.print(f"measured: matmul {F / 1e9:.1f} GFLOP/s, copy {W / 1e9:.2f} GB/s (read + write)")

    table = Table(title=f"{'sampled (T=1)' if a.sample else 'greedy'} decode, prompt {a.prompt_len}, {a.new_tokens} new tokens, fp32, "
                        f"{a.threads} threads (tokens/s)")
    for col in ("model", "batch", "sidpt", "transformers", "sidpt / HF", "roofline", "sidpt % roof",
                "HF % roof", "bound"):
        table.add_column(col, justify="right")
    g = torch.Generator().manual_seed(0)
    for size in a.sizes:
        if os.path.isdir(size):  # a real checkpoint: both engines load the same directory
            model = load_checkpoint(size)
            args, name = model.args, os.path.basename(os.path.normpath(size))
        elif size in SIZES:
            args, name = SIZES[size], size
            model = build_model(args, seed=0)
        else:
            raise SystemExit(f"--sizes {size!r}: neither a named size ({', '.join(SIZES)}) nor a directory")
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = size if os.path.isdir(size) else tmp  # what transformers loads
            if hf_dir == tmp and not a.no_hf:
                save_checkpoint(tmp, model)
            for B in a.batches:
                prompts = torch.randint(0, args.vocab_size, (B, a.prompt_len), generator=g).tolist()
                n = B * a.new_tokens
                t_s = bench_sidpt(model, prompts, a.new_tokens, a.repeats, a.sample)
                t_h = None if a.no_hf else bench_hf(hf_dir, prompts, a.new_tokens, a.repeats, a.sample)
                roof = roofline_seconds(args, B, a.prompt_len, a.new_tokens, F, W)
                flops_t = 2 * B * (args.num_params(False) + args.vocab_size * args.dim) / F
                bytes_t = 4 * (args.num_params(False) + args.vocab_size * args.dim) / W
                table.add_row(
                    f"{name} ({model_params(args) / 1e6:.1f}M)", str(B), f"{n / t_s:.0f}",
                    "-" if t_h is None else f"{n / t_h:.0f}",
                    "-" if t_h is None else f"{t_h / t_s:.2f}x",
                    f"{n / roof:.0f}", f"{100 * roof / t_s:.0f}%",
                    "-" if t_h is None else f"{100 * roof / t_h:.0f}%",
                    "compute" if flops_t > bytes_t else "memory",
                )
                console.print(f"  {name} batch {B}: sidpt {n / t_s:.0f} tok/s"
                              + ("" if t_h is None else f", transformers {n / t_h:.0f} tok/s"))
                gc.collect()
    console.print(table)


def model_params(args: ModelArgs) -> int:
    return args.num_params(embeddings=True)


if __name__ == "__main__":
    main()
