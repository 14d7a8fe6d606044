"""The kernel correctness suite as a command: every kernel's hypothesis properties against its
float64 reference, on every implementation this machine has (the torch path; the Triton code
compiled on a GPU, under the interpreter on a CPU), and a table.

    python -m kernels.check                  # the default budget of cases per kernel and path
    python -m kernels.check --examples 200   # more

The tests (tests/kernels/) run the same properties with a smaller budget; this module is where
they live. Error: the largest absolute error over the largest reference magnitude (floored at 1).
Tolerance: float32 <= 1e-5, float16 <= 1e-2; for the log-prob kernel, where float32 itself
cannot meet that (logits in the hundreds: an ulp of the logit is ~3e-5 of a log-prob near 0),
twice the error of the naive float32 computation of the same case.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # read when a kernel is decorated: before kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels import backend  # noqa: E402
from kernels.linear_logprob import IGNORE, linear_logprob, linear_logprob_reference  # noqa: E402
from kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference  # noqa: E402
from kernels import batch_invariant as bi  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def implementations() -> list[str]:
    """The torch path, and the Triton code where it can run here."""
    if torch.cuda.is_available():
        return ["torch", backend(torch.device("cuda"))]
    return ["torch"] + (["interpret"] if backend(torch.device("cpu")) == "interpret" else [])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - want.detach()).abs().max() / want.detach().abs().max().clamp(min=1.0))


def linear_logprob_errors(impl: str, N: int, V: int, D: int, dtype: torch.dtype, temperature: float, scale: float,
                          ignored: float, seed: int) -> dict[str, float]:
    """One drawn case of the fused log-prob + entropy: the relative error of the log-probs, the
    entropies and both gradients against the float64 reference, for random upstream gradients.
    ``scale``: the logits' magnitude (40: rows whose distribution is nearly one token)."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * scale / D**0.5).to(dtype)
    w = torch.randn(V, D, generator=g).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = IGNORE
    g_lp, g_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)

    def outputs(dtype, fn, device="cpu"):  # log-prob, entropy, dh, dW of ``fn`` in ``dtype``
        x = h.to(device, dtype, copy=True).requires_grad_()  # a leaf of its own: no gradient shared between calls
        y = w.to(device, dtype, copy=True).requires_grad_()
        lp, ent = fn(x, y, targets.to(device))
        (lp * g_lp.to(device, lp.dtype) + ent * g_ent.to(device, lp.dtype)).sum().backward()
        return lp, ent, x.grad, y.grad

    want = outputs(torch.float64, lambda x, y, t: linear_logprob_reference(x, y, t, temperature))
    naive = outputs(torch.float32, lambda x, y, t: linear_logprob_reference(x, y, t, temperature, torch.float32))
    device = "cuda" if impl == "triton" else "cpu"
    got = outputs(h.dtype, lambda x, y, t: linear_logprob(x, y, t, temperature, impl=impl), device)
    if bool((got[0].cpu()[targets == IGNORE] != 0).any()):
        return {"ignored rows": float("inf")}
    # each output's error, and as a fraction of what its dtype allows here
    out = {}
    for name, a, n, b in zip(("log-prob", "entropy", "dh", "dW"), got, naive, want):
        out[name] = rel_err(a, b) / max(TOL[h.dtype], 2 * rel_err(n, b))
        out[f"{name} error"] = rel_err(a, b)
    return out


def linear_logprob_property(impl: str, max_examples: int) -> dict[torch.dtype, tuple[int, float, float]]:
    """Hypothesis draws shapes (N = 1, odd sizes, vocabularies no multiple of a block), dtypes,
    temperatures, logit magnitudes and ignored rows; every case must meet its tolerance. Returns
    dtype -> (cases, the worst error as a fraction of what is allowed, the worst error)."""
    seen: dict[torch.dtype, tuple[int, float, float]] = {}

    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(N=st.integers(1, 40), V=st.integers(1, 200), D=st.integers(1, 48), dtype=st.sampled_from(list(TOL)),
           temperature=st.floats(0.3, 2.0), scale=st.sampled_from([0.1, 3.0, 40.0]),
           ignored=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**31 - 1))
    def prop(N, V, D, dtype, temperature, scale, ignored, seed):
        errs = linear_logprob_errors(impl, N, V, D, dtype, temperature, scale, ignored, seed)
        worst = max(v for k, v in errs.items() if not k.endswith(" error"))
        n, w, raw = seen.get(dtype, (0, 0.0, 0.0))
        seen[dtype] = (n + 1, max(w, worst), max([raw] + [v for k, v in errs.items() if k.endswith(" error")]))
        assert worst <= 1.0, (errs, impl, dict(N=N, V=V, D=D, dtype=dtype, temperature=temperature, scale=scale,
                                                      ignored=ignored, seed=seed))

    prop()
    return seen


def paged_attention_errors(impl: str, B: int, G: int, KV: int, hd: int, block_size: int, longest: int,
                           dtype: torch.dtype, scale: float, seed: int) -> dict[str, float]:
    """One drawn case of the paged decode attention: B sequences with context lengths 1 ..
    ``longest`` whose blocks are scattered over the pool in a random order (the table padded
    with the scratch block, as the engine pads it), G query heads per KV head."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, longest + 1, (B,), generator=g)
    need = [-(-int(n) // block_size) for n in ctx]
    n_blocks = sum(need) + 1
    pool = (n_blocks + 1) * block_size
    k = (torch.randn(pool, KV, hd, generator=g) * scale).to(dtype)
    v = torch.randn(pool, KV, hd, generator=g).to(dtype)
    q = torch.randn(B, G * KV, hd, generator=g).to(dtype)
    order = torch.randperm(n_blocks, generator=g).tolist()
    table = torch.full((B, max(need)), n_blocks, dtype=torch.int64)  # n_blocks: the scratch block
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[:n])
        order = order[n:]
    want = paged_decode_attention_reference(q, k, v, table, ctx, block_size)
    device = "cuda" if impl == "triton" else "cpu"
    got = paged_decode_attention(q.to(device), k.to(device), v.to(device), table.to(device), ctx.to(device),
                                 block_size, impl=impl)
    return {"output": rel_err(got, want)}


def paged_attention_property(impl: str, max_examples: int) -> dict[torch.dtype, tuple[int, float, float]]:
    """Hypothesis draws batch sizes (1 included), GQA groups, head sizes no power of two, block
    sizes, context lengths (one key to several blocks), key magnitudes and dtypes."""
    seen: dict[torch.dtype, tuple[int, float, float]] = {}

    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(B=st.integers(1, 6), G=st.integers(1, 4), KV=st.integers(1, 3), hd=st.integers(1, 40),
           block_size=st.sampled_from([1, 4, 16]), longest=st.integers(1, 70), dtype=st.sampled_from(list(TOL)),
           scale=st.sampled_from([0.3, 1.0, 8.0]), seed=st.integers(0, 2**31 - 1))
    def prop(B, G, KV, hd, block_size, longest, dtype, scale, seed):
        errs = paged_attention_errors(impl, B, G, KV, hd, block_size, longest, dtype, scale, seed)
        n, w, raw = seen.get(dtype, (0, 0.0, 0.0))
        seen[dtype] = (n + 1, max(w, errs["output"] / TOL[dtype]), max(raw, errs["output"]))
        assert errs["output"] <= TOL[dtype], (errs, impl, B, G, KV, hd, block_size, longest, dtype)

    prop()
    return seen


def batch_invariant_errors(impl: str, op: str, M: int, K: int, N: int, dtype: torch.dtype, scale: float,
                           seed: int) -> dict[str, float]:
    """One drawn case of a batch-invariant op against its float64 reference, and its
    invariance: the first rows computed alone must be bitwise the rows computed in the batch
    (reported as an infinite error when not)."""
    g = torch.Generator().manual_seed(seed)
    device = "cuda" if impl == "triton" else "cpu"
    if op == "matmul":
        x, w = (torch.randn(M, K, generator=g) * scale).to(dtype), torch.randn(N, K, generator=g).to(dtype)
        run = lambda rows: bi.matmul(rows.to(device), w.to(device), impl=impl)  # noqa: E731
        want = bi.matmul_reference(x, w)
    elif op == "rms_norm":
        x, w = (torch.randn(M, K, generator=g) * scale).to(dtype), (torch.rand(K, generator=g) + 0.5).to(dtype)
        run = lambda rows: bi.rms_norm(rows.to(device), w.to(device), 1e-6, impl=impl)  # noqa: E731
        want = bi.rms_norm_reference(x, w, 1e-6)
    else:  # attention: M sequences, one query each (decode) at a random position of K keys, N = hd
        KV, G = 1 + seed % 2, 1 + seed % 3
        x = (torch.randn(M, KV * G, 1, N, generator=g) * scale).to(dtype)
        k, v = torch.randn(M, KV, K, N, generator=g).to(dtype), torch.randn(M, KV, K, N, generator=g).to(dtype)
        start = torch.randint(0, K, (M,), generator=g)
        run = lambda rows: bi.attention(rows.to(device), k[: len(rows)].to(device), v[: len(rows)].to(device),  # noqa: E731
                                        start[: len(rows)].to(device), impl=impl)
        want = bi.attention_reference(x, k, v, start)
    got = run(x)
    first = run(x[: max(1, M // 3)])
    same = torch.equal(first.cpu(), got[: first.shape[0]].cpu())
    return {"output": rel_err(got, want) if same else float("inf")}


def batch_invariant_property(impl: str, max_examples: int) -> dict[torch.dtype, tuple[int, float, float]]:
    """matmul, RMSNorm and attention: odd sizes, one row to several tiles, scales, dtypes; each
    within tolerance of float64 and its first rows bitwise the same alone and in the batch."""
    seen: dict[torch.dtype, tuple[int, float, float]] = {}

    @settings(max_examples=max_examples, deadline=None, database=None)
    @given(op=st.sampled_from(["matmul", "rms_norm", "attention"]), M=st.integers(1, 40), K=st.integers(1, 90),
           N=st.integers(1, 40), dtype=st.sampled_from(list(TOL)), scale=st.sampled_from([0.1, 1.0, 30.0]),
           seed=st.integers(0, 2**31 - 1))
    def prop(op, M, K, N, dtype, scale, seed):
        errs = batch_invariant_errors(impl, op, M, K, N, dtype, scale, seed)
        n, w, raw = seen.get(dtype, (0, 0.0, 0.0))
        seen[dtype] = (n + 1, max(w, errs["output"] / TOL[dtype]), max(raw, errs["output"]))
        assert errs["output"] <= TOL[dtype], (errs, impl, op, M, K, N, dtype, scale)

    prop()
    return seen


KERNELS = {"linear_logprob": linear_logprob_property, "paged_decode_attention": paged_attention_property,
           "batch_invariant": batch_invariant_property}  # matmul, rms_norm, attention


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=50, help="hypothesis cases per kernel and implementation")
    a = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    t = Table(title=f"kernel correctness vs float64 ({'GPU' if torch.cuda.is_available() else 'CPU'})")
    for col in ("kernel", "path", "dtype", "cases", "max error", "tolerance", "worst / allowed", "pass", "s"):
        t.add_column(col, justify="right")
    failures = []
    for name, prop in KERNELS.items():
        for impl in implementations():
            t0 = time.perf_counter()
            try:
                seen = prop(impl, a.examples)
            except AssertionError as e:  # hypothesis shrank a failing case: reported below the table
                seen = {}
                failures.append(f"{name} [{impl}]: {e}")
            dt = time.perf_counter() - t0
            if not seen:
                t.add_row(name, impl, "-", "-", "-", "-", "-", "[red]FAIL[/]", f"{dt:.0f}")
            for dtype, (n, frac, raw) in seen.items():
                tol = f"{TOL[dtype]:.0e}" + (" or 2x naive fp32" if name == "linear_logprob" else "")
                t.add_row(name, impl, str(dtype).removeprefix("torch."), str(n), f"{raw:.1e}", tol, f"{frac:.2f}",
                          "pass" if frac <= 1.0 else "[red]FAIL[/]", f"{dt:.0f}")
    console.print(t)
    for f in failures:
        console.print(f"[red]failing case[/] {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
