"""Weight publish throughput, trainer -> rollout, in GB/s against a memcpy roofline measured in this run.

    python tools/bench_publish.py                     # 25M and SmolLM2-135M's shape, 1/2/3 receivers
    python tools/bench_publish.py --quick             # smoke: 25M, two bucket sizes, 1 receiver
    python tools/bench_publish.py --sizes SmolLM2-135M --buckets 16 64 --receivers 1 --reps 5

What is timed is sidpt's own publish path, float32, random init:

* **colocated**: ``engine.update_weights(trainer.full_weights(bucket_mb))`` in one process; the
  Trainer holds the plain module (no mesh: ``full_weights`` yields ``p.detach()``, no all-gather),
  the Engine its own copy (a real ``Engine`` with a tiny KV cache), as ``controller.publish`` does.
* **disaggregated**: 1 trainer rank -> R rollout ranks, real processes over gloo (loopback TCP),
  the trainer calling ``broadcast_weights(trainer.full_weights(bucket_mb), src=0, group=g, send=True)``
  and each receiver ``engine.update_weights(receive_weights(engine.model, bucket_mb, src=0, group=g))``
  into a real ``Engine`` (tiny KV cache); timed from a barrier on ``g`` before to one after.

References measured in the same run (same thread count, 1 per process):

* **memcpy roofline**: one ``dst.copy_(src)`` of the model's total bytes into a preallocated,
  already-touched ``dst`` (and, for information, into a fresh ``torch.empty`` one: page faults
  included, as a freshly allocated receive buffer pays them);
* **gloo link ceiling**: one ``dist.broadcast`` of a single buffer of the model's bytes over the same
  group of R + 1 processes (no flattening, no copy-in: the best gloo can do for that transfer).

GB/s = model bytes (1e9) / seconds, per receiver (each receives the full model); "all recv" is R
times that. Best of ``--reps`` after one warm-up. Receivers' weights are zeroed before every rep and
checked bitwise against the sender's (sha256 of every parameter's bytes) after each configuration.
"faults" are the minor page faults of the best rep (sender / the most of any receiver): a bucket
above glibc's mmap threshold (32 MiB at most) is a fresh mapping on every publish, and touching
it faults every page in (``THP_MEM_ALLOC_ENABLE=1`` makes torch ask for 2 MiB hugepages instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from sidpt.dist.transfer import broadcast_weights, bucket_names, receive_weights
from sidpt.model.model import SIZES, ModelArgs, Transformer, build_model
from sidpt.rollout import Engine, EngineConfig
from sidpt.trainer import OptimConfig, Trainer

SHAPES: dict[str, ModelArgs] = {
    "25M": SIZES["25M"],
    "SmolLM2-135M": ModelArgs(family="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                              intermediate_size=1536, tie_embeddings=True, rope_theta=100000.0),
}
GB = 1e9


# -- the pieces ---------------------------------------------------------------------------------

def machine_line(threads: int) -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu}, {cores} cores, torch {torch.__version__}, {threads} torch thread(s) per process, "
            f"gloo over loopback TCP, load average {os.getloadavg()[0]:.2f}")


def make_trainer(args: ModelArgs) -> Trainer:
    """The sender: a Trainer over the plain (unsharded) random-init module."""
    return Trainer(build_model(args, seed=0), OptimConfig(1e-3, 0.0, (0.9, 0.99), 1.0, 4096))


def make_engine(args: ModelArgs) -> Engine:
    """A receiver: a real Engine with its own (uninitialised) model and a tiny KV cache."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu").to(torch.float32)
    return Engine(model, EngineConfig(block_size=16, num_blocks=4, max_seqs=1, max_model_len=64,
                                      max_prefill_tokens=64))


def model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def n_buckets(model: torch.nn.Module, bucket_mb: float) -> int:
    return len(bucket_names(((n, p.numel() * p.element_size()) for n, p in model.named_parameters()), bucket_mb))


@torch.no_grad()
def zero(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.zero_()


def digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests = bitwise-equal weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(memoryview(p.detach().contiguous().view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def best_of(fn, reps: int, before=None) -> tuple[float, int]:
    """(best wall time of ``fn()`` over ``reps`` runs after one warm-up, this process's minor page
    faults during that run); ``before()`` runs untimed before each."""
    best, faults = float("inf"), 0
    for r in range(reps + 1):
        if before is not None:
            before()
        f, t = minor_faults(), time.perf_counter()
        fn()
        dt, df = time.perf_counter() - t, minor_faults() - f
        if r and dt < best:
            best, faults = dt, df
    return best, faults


def memcpy_seconds(nbytes: int, reps: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """best_of of one copy_ of nbytes into a touched dst, and into a fresh torch.empty dst."""
    src = torch.ones(nbytes // 4)
    warm = best_of(lambda dst=torch.empty_like(src): dst.copy_(src), reps)  # dst freed with the lambda
    fresh = best_of(lambda: torch.empty_like(src).copy_(src), reps)
    return warm, fresh


def colocated(args: ModelArgs, buckets: list[float], reps: int) -> list[dict]:
    trainer, engine = make_trainer(args), make_engine(args)
    ref = digest(trainer.model)
    rows = []
    for b in buckets:
        sec, flt = best_of(lambda: engine.update_weights(trainer.full_weights(b)), reps,
                           before=lambda: zero(engine.model))
        rows.append(dict(mode="colocated", receivers=1, bucket_mb=b, buckets=n_buckets(trainer.model, b),
                         seconds=sec, faults=[flt], bitwise=digest(engine.model) == ref))
    return rows


# -- disaggregated: real processes --------------------------------------------------------------

def _worker(rank: int, world: int, port: int, args: ModelArgs, buckets: list[float], receivers: list[int],
            reps: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if rank == 0:
            trainer = make_trainer(args)
            model = trainer.model
        else:
            engine = make_engine(args)
            model = engine.model
        nbytes = model_bytes(model)
        ref = digest(model) if rank == 0 else None
        rows = []
        for R in receivers:
            g = dist.new_group(list(range(R + 1)))  # every rank of the world takes part in new_group
            if rank <= R:
                def timed(fn):
                    dist.barrier(group=g)
                    fn()
                    dist.barrier(group=g)

                buf = torch.ones(nbytes // 4) if rank == 0 else torch.empty(nbytes // 4)
                sec, flt = best_of(lambda: timed(lambda: dist.broadcast(buf, src=0, group=g)), reps)
                del buf
                got = [None] * (R + 1)
                dist.all_gather_object(got, flt, group=g)
                rows.append(dict(mode="gloo link", receivers=R, bucket_mb=None, buckets=1, seconds=sec,
                                 faults=got, bitwise=None))
                for b in buckets:
                    if rank == 0:
                        def publish():
                            broadcast_weights(trainer.full_weights(b), src=0, group=g, send=True)
                    else:
                        def publish():
                            engine.update_weights(receive_weights(engine.model, b, src=0, group=g))
                    before = (lambda: zero(model)) if rank else None
                    sec, flt = best_of(lambda: timed(publish), reps, before=before)
                    got = [None] * (R + 1)
                    dist.all_gather_object(got, (ref if rank == 0 else digest(model), flt), group=g)
                    rows.append(dict(mode="disaggregated", receivers=R, bucket_mb=b, buckets=n_buckets(model, b),
                                     seconds=sec, faults=[f for _, f in got],
                                     bitwise=all(d == got[0][0] for d, _ in got[1:])))
            dist.barrier()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disaggregated(args: ModelArgs, buckets: list[float], receivers: list[int], reps: int) -> list[dict]:
    world = 1 + max(receivers)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, free_port(), args, buckets, receivers, reps, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


# -- main ---------------------------------------------------------------------------------------

def thp_note() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        thp = "?"
    return f"transparent hugepages: {thp}, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--buckets", nargs="+", type=float, default=[1, 4, 16, 64, 256], help="publish bucket MB")
    ap.add_argument("--receivers", nargs="+", type=int, default=[1, 2, 3], help="rollout ranks (0: colocated only)")
    ap.add_argument("--reps", type=int, default=2, help="timed reps after one warm-up (best of)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the single-process rows")
    ap.add_argument("--quick", action="store_true", help="smoke run: 25M, buckets 4 and 64 MB, 1 receiver, 1 rep")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.buckets, a.receivers, a.reps = ["25M"], [4, 64], [1], 1
    receivers = sorted({r for r in a.receivers if r > 0})
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned ranks
    console = Console(width=None if sys.stdout.isatty() else 170)
    console.print(machine_line(a.threads))
    console.print(thp_note())
    if os.getloadavg()[0] > 0.5:
        console.print(f"[yellow]load average {os.getloadavg()[0]:.2f}: another process is busy, timings will be low[/]")

    table = Table(title=f"weight publish, fp32, random init, best of {a.reps} after a warm-up; "
                        "GB/s = model bytes / s, per receiver")
    for col in ("model", "mode", "recv", "bucket MB", "buckets", "seconds", "GB/s", "all recv GB/s",
                "/ memcpy", "/ gloo link", "faults snd/rcv", "bitwise"):
        table.add_column(col, justify="right", no_wrap=True)
    checks = []
    t_start = time.perf_counter()
    for size in a.sizes:
        args = SHAPES[size]
        nbytes = 4 * args.num_params()
        name = f"{size} ({nbytes / 2**20:.0f} MiB)"
        (warm, wflt), (fresh, fflt) = memcpy_seconds(nbytes, max(a.reps, 3))
        table.add_row(name, "memcpy roofline", "-", "-", "-", f"{warm:.4f}", f"{nbytes / warm / GB:.2f}", "-",
                      "1.00", "-", str(wflt), "-")
        table.add_row(name, "memcpy, fresh dst", "-", "-", "-", f"{fresh:.4f}", f"{nbytes / fresh / GB:.2f}", "-",
                      f"{warm / fresh:.2f}", "-", str(fflt), "-")
        rows = colocated(args, a.buckets, a.reps)
        console.print(f"  {size}: colocated done ({time.perf_counter() - t_start:.0f} s)")
        if receivers:
            rows += disaggregated(args, a.buckets, receivers, a.reps)
            console.print(f"  {size}: disaggregated done ({time.perf_counter() - t_start:.0f} s)")
        link = {r["receivers"]: r["seconds"] for r in rows if r["mode"] == "gloo link"}
        for r in rows:
            sec, R, flt = r["seconds"], r["receivers"], r["faults"]
            if r["bitwise"] is not None:
                checks.append((size, r["mode"], R, r["bucket_mb"], r["bitwise"]))
            table.add_row(
                name, r["mode"], str(R), "-" if r["bucket_mb"] is None else f"{r['bucket_mb']:g}", str(r["buckets"]),
                f"{sec:.4f}", f"{nbytes / sec / GB:.2f}", f"{R * nbytes / sec / GB:.2f}", f"{warm / sec:.2f}",
                f"{link[R] / sec:.2f}" if r["mode"] == "disaggregated" else ("1.00" if r["mode"] == "gloo link" else "-"),
                str(flt[0]) if len(flt) == 1 else f"{flt[0]}/{max(flt[1:])}",
                "-" if r["bitwise"] is None else ("yes" if r["bitwise"] else "[red]NO[/]"),
            )
        table.add_section()
    console.print(table)
    console.print("faults: minor page faults in the best rep (sender / the most of any receiver); "
                  f"a fault maps a 4 KiB page ({nbytes // 4096} of them hold the model) or a 2 MiB hugepage")
    ok = sum(c[-1] for c in checks)
    console.print(f"receivers' weights bitwise equal to the sender's: {ok} of {len(checks)} configurations"
                  + (" (all)" if ok == len(checks) else ""))
    console.print(f"total {time.perf_counter() - t_start:.0f} s")
    assert ok == len(checks), [c for c in checks if not c[-1]]


if __name__ == "__main__":
    main()
