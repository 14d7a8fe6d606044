"""Everything a run does before its first step: the run directory, threads, the task, the
tokenizer and the policy, the start-up checks, and the stop flag read at every step boundary."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from sidpt.config import Config, ConfigError, save_config
from sidpt.data import fit_questions, task_tokenizer
from sidpt.dist.world import World, all_reduce_max, barrier
from sidpt.files import atomic_write
from sidpt.model import SIZES, build_model, load_checkpoint
from sidpt.model.model import DTYPES
from sidpt.model.tokenizer import Tokenizer


def start_run(cfg: Config, world: World) -> tuple[Console, Path]:
    """The console (quiet off the main rank) and the run directory, refused when it holds an
    earlier run; the resolved config saved in it."""
    # piped to a file, rich wraps at 80 columns mid-phrase: lines as long as a log line instead
    console = Console(quiet=not world.is_main, width=None if sys.stdout.isatty() else 160)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    # resuming: into this config's own run directory (with no checkpoint yet, as after an elastic
    # restart before the first one, the run starts again from scratch)
    resuming = cfg.run.resume == "auto" and (run_dir / "config.toml").exists()
    if resuming:
        check_same_config(cfg, run_dir / "config.toml")
    else:
        check_run_dir(run_dir, cfg.run.overwrite)  # every rank, before any rank writes
    barrier()  # start-up: the world, before any role exists
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")
    return console, run_dir


def load_policy(cfg: Config, task, world: World) -> tuple[Tokenizer, torch.nn.Module]:
    """The tokenizer and the policy: a checkpoint (``model.path``), or a random-init model of
    ``model.size`` with a tokenizer trained on the task's text (cached beside the task)."""
    dtype = DTYPES[cfg.model.dtype]
    torch.manual_seed(cfg.run.seed)
    if cfg.model.path:
        tok = Tokenizer(cfg.model.path)
        policy = load_checkpoint(cfg.model.path, dtype=dtype, device=world.device)
        check_vocab(tok.vocab_size, policy.args.vocab_size, cfg.model.path)
        return tok, policy
    if cfg.model.size not in SIZES:
        raise ConfigError(f"model.size={cfg.model.size!r}: expected one of {list(SIZES)}")
    tok = task_tokenizer(task.tokenizer_texts, task.tokenizer_dir, cfg.model.vocab_size, world.is_main,
                         cfg.model.tokenizer)
    args = dataclasses.replace(SIZES[cfg.model.size], vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
    return tok, build_model(args, dtype=dtype, device=world.device, seed=cfg.run.seed)


def prompt_encoder(cfg: Config, task, tok: Tokenizer):
    """sample -> prompt ids: the task's prompt as raw text, or (``task.chat``) the model's own chat
    template with an optional system message, ending with the assistant header."""
    def prompt_ids(sample) -> list[int]:
        if not cfg.task.chat:
            return tok.encode(task.prompt(sample))
        system = [{"role": "system", "content": cfg.task.system}] if cfg.task.system else []
        return tok.encode_chat(system + [{"role": "user", "content": task.prompt(sample)}], add_generation_prompt=True)
    return prompt_ids


def fit_samples(cfg: Config, task, prompt_ids, console: Console) -> None:
    """Check every train and held-out prompt against ``rollout.max_model_len`` before any training
    (``task.too_long``: an error naming file, line and id, or leave them out and say how many)."""
    for name in ("train", "heldout"):
        qs = getattr(task, name)
        kept, n_out = fit_questions(qs, [len(prompt_ids(q)) for q in qs], cfg.rollout.max_model_len,
                                    cfg.task.too_long, name)
        if n_out:
            console.print(f"[yellow]{name}: {n_out} of {len(qs)} samples left out (prompt >= "
                          f"rollout.max_model_len={cfg.rollout.max_model_len}; task.too_long='skip')[/]")
        qs[:] = kept
    if not task.train or not task.heldout:
        raise ConfigError("no train or no held-out sample fits rollout.max_model_len")


def report_skipped_rows(task, run_dir: Path, is_main: bool, console: Console) -> None:
    """Malformed data rows an environment left out (``env.bad_rows = "skip"``, its ``skipped_rows``):
    counted on the console and listed, file and line, in ``skipped_rows.txt``."""
    rows = list(getattr(task, "skipped_rows", ()))
    if rows and is_main:
        atomic_write(run_dir / "skipped_rows.txt", "".join(f"{row}\n" for row in rows))
        console.print(f"[yellow]{len(rows)} malformed data row(s) skipped (env.bad_rows='skip'), listed in "
                      f"{run_dir / 'skipped_rows.txt'}; the first: {rows[0]}[/]")


class StopRequest:
    """SIGINT / SIGTERM set a flag that the loops read at step boundaries, so an interrupted run
    still evaluates and saves; a second SIGINT (more than a second later) interrupts at once. ``requested()`` agrees on
    every rank (one max all-reduce), so no rank leaves the loop alone and hangs the others."""

    # torchrun passes the Ctrl-C it receives on to its ranks, which got it from the terminal
    # already: a repeat this soon after the first is that echo (measured: milliseconds), not a
    # second Ctrl-C. Taking it for one stopped every rank mid-evaluation, nothing saved.
    ECHO_S = 1.0

    def __init__(self, world: World):
        self.world, self.signal, self.first = world, None, 0.0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        # a file-size limit (ulimit -f, a quota) must fail the write (EFBIG: a checkpoint write is
        # then dropped and reported, sidpt.checkpoint), not kill the rank as SIGXFSZ does by default
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.first = signal.Signals(signum).name, now
        elif signum == signal.SIGINT and now - self.first > self.ECHO_S:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def requested(self, group=None) -> bool:
        """Agreed over ``group``: the world (``None``) between RL steps, where every role takes
        part; the trainer mesh's group inside the warm-start, which only trainer ranks run."""
        flag = all_reduce_max([float(self.signal is not None)], self.world.device, group)[0]
        if flag and self.signal is None:
            self.signal = "a signal on another rank"
        return bool(flag)


# keys a resumed run may change: how long it runs and how it checkpoints
# what may change between a run and its resume: its length, how it checkpoints, and where its
# directory lives (a run directory moved to another file system resumes there)
RESUME_FREE = {"run.steps", "run.resume", "run.overwrite", "run.checkpoint_every", "run.keep_checkpoints", "run.out_dir",
               "run.trace_steps", "run.telemetry_s"}


def check_same_config(cfg: Config, saved: Path) -> None:
    """Resuming: the run directory's config must be this one, up to ``RESUME_FREE``."""
    from sidpt.config import flatten, load_config

    if not saved.exists():
        raise ConfigError(f"run.resume='auto': {saved} is missing; the checkpoints beside it cannot be matched to a config")
    old, new = flatten(load_config(saved)), flatten(cfg)
    diff = sorted(k for k in old.keys() | new.keys() if k not in RESUME_FREE and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"run.resume='auto': {saved.parent} was written by another config ({shown}); resume with "
                          f"the same config, or choose another run.name")


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to run into an earlier run's directory (its config, metrics, examples and plot would be
    replaced) unless ``run.overwrite``."""
    earlier = [p.name for p in (run_dir / "config.toml", run_dir / "metrics.jsonl") if p.exists()]
    if earlier and not overwrite:
        raise ConfigError(f"run directory {run_dir} holds an earlier run ({', '.join(earlier)}): choose another "
                          f"--run.name, or pass --run.overwrite=true to replace it")


def check_vocab(tokenizer_size: int, model_size: int, path: str) -> None:
    """A tokenizer larger than the embedding would fail at the first unknown id, deep in a forward
    (``IndexError: index out of range in self``); a larger embedding (padded rows) is fine."""
    if tokenizer_size > model_size:
        raise ConfigError(f"model.path={path!r}: its tokenizer has {tokenizer_size} tokens, the model's "
                          f"embedding only {model_size} rows")


def set_threads(threads: int, local_ranks: int) -> int:
    """torch threads per rank: ``run.threads``, or the cores this process may run on (its CPU
    affinity, which SLURM and taskset set; not every core of the machine) over the local ranks."""
    if not threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // local_ranks)
    torch.set_num_threads(threads)
    return threads


def threads_note(threads: int, local_ranks: int) -> str:
    """The thread choice, and a warning when the load average says other jobs are using the cores:
    torch on busy cores slows down 20-80x (../shared/ENVIRONMENT.md), and the knob is run.threads."""
    note = f"torch threads per rank: {threads} (run.threads)"
    if hasattr(os, "getloadavg") and hasattr(os, "sched_getaffinity"):
        load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
        if load > 0.5 and threads * local_ranks > max(1, round(cores - load)):
            note += (f"; [yellow]load average {load:.1f} on {cores} cores: if other jobs share them, "
                     f"--run.threads=1 can be many times faster[/]")
    return note


