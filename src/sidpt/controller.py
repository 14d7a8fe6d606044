"""The controller: the whole dataflow of a run in one loop, executed by every rank.

    plan      = build_plan(world, placement)                 # role meshes, same on every rank
    trainer   = Trainer(policy, mesh=plan.trainer_mesh)      # FSDP2 over the trainer mesh
    engine    = Engine(copy of the policy)                   # native engine, paged KV cache
    sft warm-start (optional), evaluate
    for step in steps:
        jobs      = this rank's share of the step's prompts  # chosen from (seed, step): no broadcast
        episodes  = run_episodes(engine, env, jobs)          # multi-turn search, per-token logprobs
        batch     = episodes_to_batch(episodes)              # TensorDict, loss_mask on sampled tokens
        batch     = compute_advantages(batch)                # GRPO: from the rewards alone
        part      = trainer.recompute(batch[signal])         # old (and ref) logprobs; zero-advantage
        mismatch  = mismatch_metrics(part)                   #   rows skipped (exact), see train.skip_zero_adv
        part      = apply_correction(part)                   # trainer vs engine, every step
        stats     = trainer.rl_step(part, norm_mask=batch's) # micro-batches, normalisers on all rows
        publish(trainer -> engine)                           # full-tensor buckets, version += 1
        log(step, ...)
    evaluate, table, reward curve

Colocated placement only: rollout and training alternate on every rank, and each rank trains on
the episodes it generated (groups never straddle ranks, so advantages need no communication;
loss normalisers and metrics are all-reduced). The disaggregated async pipeline is not built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sidpt.batch import LOSS_MASK, OLD_LOGPROBS, REWARD, ROLLOUT_LOGPROBS, SEQ_LEN
from sidpt.config import Config, ConfigError, save_config
from sidpt.data import (
    fit_questions,
    episode_seed, episode_tensors, prepare_task, sft_batch, spread_questions, step_indices, task_tokenizer,
)
from sidpt.dist.plan import build_plan
from sidpt.dist.world import World, all_reduce_max, all_reduce_sum, gather_to_main, init_world, shutdown
from sidpt.env.base import FINISH_CODES
from sidpt.env.search import INSTRUCTION, SearchEnv, format_prompt, load_questions, prompt_messages
from sidpt.env.task import sft_episodes
from sidpt.metrics import MetricsLog, Timers, plot_reward_curve
from sidpt.model import SIZES, Transformer, build_model, load_checkpoint, save_checkpoint
from sidpt.model.model import DTYPES, count_params
from sidpt.model.tokenizer import Tokenizer
from sidpt.rl import REWEIGHT_ONLY, TRAIN_MASK, apply_correction, compute_advantages, mismatch_metrics
from sidpt.rollout import Engine, EngineConfig, Request, SamplingParams
from sidpt.rollout.multiturn import Job, episodes_to_batch, run_episodes
from sidpt.trainer import OptimConfig, Trainer, loss_free, lr_at, sequence_logprobs, signal_rows


def run(cfg: Config) -> dict[str, dict[str, float]]:
    world = init_world()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
    threads = set_threads(cfg.run.threads, local_ranks)
    plan = build_plan(world, cfg.run.placement, cfg.run.rollout_ranks)
    if plan.placement != "colocated":
        raise ConfigError("run.placement='disaggregated': the async pipeline is not built yet; use 'colocated'")
    if cfg.rollout.prompts_per_step % world.world_size:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must divide by the "
                          f"{world.world_size} rollout ranks")
    # piped to a file, rich wraps at 80 columns mid-phrase: lines as long as a log line instead
    console = Console(quiet=not world.is_main, width=None if sys.stdout.isatty() else 160)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    check_run_dir(run_dir, cfg.run.overwrite)  # every rank, before any rank writes
    if world.distributed:
        torch.distributed.barrier()
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")

    # -- task, tokenizer, model ---------------------------------------------------------------
    task = prepare_task(cfg.task.dir, cfg.task.n_entities, cfg.task.seed, world.is_main, cfg.task.sft_frac,
                        cfg.task.name_pool, cfg.task.sft_entities, tuple(cfg.task.attributes),
                        need_sft=cfg.sft.steps > 0)
    env_cfg = dataclasses.replace(cfg.env, corpus=cfg.env.corpus or str(task["corpus"]))
    if world.is_main:
        SearchEnv(env_cfg)  # builds the BM25 cache once, before the other ranks read it
    if world.distributed:
        torch.distributed.barrier()
    env = SearchEnv(env_cfg)
    train_q, heldout_q = load_questions(task["train"]), load_questions(task["heldout"])
    dtype = DTYPES[cfg.model.dtype]
    torch.manual_seed(cfg.run.seed)
    if cfg.model.path:
        tok = Tokenizer(cfg.model.path)
        policy = load_checkpoint(cfg.model.path, dtype=dtype, device=world.device)
        check_vocab(tok.vocab_size, policy.args.vocab_size, cfg.model.path)
    else:
        if cfg.model.size not in SIZES:
            raise ConfigError(f"model.size={cfg.model.size!r}: expected one of {list(SIZES)}")
        tok = task_tokenizer(task, cfg.model.vocab_size, world.is_main, cfg.model.tokenizer)
        args = dataclasses.replace(SIZES[cfg.model.size], vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
        policy = build_model(args, dtype=dtype, device=world.device, seed=cfg.run.seed)
    args = policy.args
    console.print(f"[bold]sidpt[/] {world.world_size} rank(s), {plan.placement}; model {args.family} "
                  f"{count_params(policy) / 1e6:.2f}M params, vocab {args.vocab_size}; run dir {run_dir}")
    console.print(threads_note(threads, local_ranks))

    with torch.device("meta"):
        engine_model = Transformer(args)
    engine_model = engine_model.to_empty(device=world.device).to(dtype)
    trainer = Trainer(policy, OptimConfig(cfg.train.lr, cfg.train.weight_decay, (cfg.train.beta1, cfg.train.beta2),
                                          cfg.train.grad_clip, cfg.train.micro_batch_tokens),
                      mesh=plan.trainer_mesh, reference=cfg.algo.kl_coef > 0)
    r = cfg.rollout
    engine = Engine(engine_model, EngineConfig(block_size=r.block_size, kv_cache_mb=r.kv_cache_mb,
                                               max_model_len=r.max_model_len, precision=r.precision,
                                               max_seqs=max(64, r.prompts_per_step * r.group_size)),
                    tokenizer=tok)
    template = cfg.task.prompt or INSTRUCTION

    def prompt_ids(question: str) -> list[int]:
        """Raw text, or (task.chat) the model's own chat template with a system prompt."""
        if not cfg.task.chat:
            return tok.encode(format_prompt(question, template))
        system = [{"role": "system", "content": cfg.task.system}] if cfg.task.system else []
        return tok.encode_chat(system + prompt_messages(question, template), add_generation_prompt=True)

    for name, qs in (("train", train_q), ("heldout", heldout_q)):  # before any training, not at step 1
        kept, n_out = fit_questions(qs, [len(prompt_ids(q.question)) for q in qs], r.max_model_len,
                                    cfg.task.too_long, str(task[name]))
        if n_out:
            console.print(f"[yellow]{name}: {n_out} of {len(qs)} questions left out (prompt >= "
                          f"rollout.max_model_len={r.max_model_len}; task.too_long='skip')[/]")
        qs[:] = kept
    if not train_q or not heldout_q:
        raise ConfigError(f"task.dir={cfg.task.dir!r}: no train or no held-out question fits rollout.max_model_len")
    probe = prompt_ids(heldout_q[0].question)
    publish(trainer, engine, cfg.train.publish_bucket_mb, version=0)
    encode = tok.encode
    decode = tok.decode
    eos = () if tok.eos_id is None else (tok.eos_id,)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main)
    timers = Timers()
    results = {}

    stop = StopRequest(world)  # SIGINT / SIGTERM: finish the step, then save what a finished run saves

    # -- SFT warm-start -----------------------------------------------------------------------
    if cfg.sft.steps:
        sft_q = spread_questions(load_questions(task["sft"]), cfg.sft.n_trajectories, cfg.run.seed)
        rows = [episode_tensors(ep, prompt_ids(ep.sample.question), encode)
                for ep in sft_episodes(env, sft_q)]
        rows = [(ids + list(eos), m + [True] * len(eos)) for ids, m in rows]  # learn to stop
        trainer.set_lr(cfg.sft.lr)
        with _progress(console) as prog:
            task_bar = prog.add_task("SFT warm-start", total=cfg.sft.steps, info="")
            for step in range(cfg.sft.steps):
                if stop.requested():
                    break
                trainer.set_lr(lr_at(step, cfg.sft.steps, cfg.sft.lr, cfg.sft.lr_schedule, cfg.sft.warmup_steps,
                                     cfg.train.min_lr_frac))
                idx = step_indices(len(rows), cfg.sft.batch_size, cfg.run.seed, step, salt=1)
                local = idx[world.rank:: world.world_size]
                stats = trainer.sft_step(sft_batch([rows[i] for i in local], tok.pad_id or 0), cfg.sft.context_weight)
                # SFT rows: their own step axis and key names (its grad norm is sft/grad_norm, not
                # the RL phase's train/grad_norm, so TensorBoard never draws them on one curve)
                log.log(step, {k.replace("train/", "sft/", 1): v for k, v in stats.items()}, step_key="sft_step")
                prog.update(task_bar, advance=1, info=f"loss {stats['sft/loss']:.3f}")
        trainer.set_lr(cfg.train.lr)
        trainer.reset_reference()  # the KL anchor is the warm-started policy, not the random init
        publish(trainer, engine, cfg.train.publish_bucket_mb)
    def evaluate_heldout(name: str) -> dict[str, float]:
        examples: list = []
        ev = evaluate(engine, env, heldout_q[: cfg.task.eval_questions], prompt_ids, encode, decode, eos, cfg, world,
                      examples)
        rows = [(x["episode"].group, _example_line(x["episode"], x["question"], decode)) for x in examples]
        rows = sorted(gather_to_main(rows, world))  # every rank's episodes, in question order
        if world.is_main:  # what the policy actually writes, for reading
            with open(run_dir / f"examples_{name}.jsonl", "w") as f:
                f.writelines(line + "\n" for _, line in rows)
        return ev

    results["before"] = evaluate_heldout("before")
    log.log(0, {f"eval/{k}": v for k, v in results["before"].items()})
    console.print(f"held-out before RL: {_fmt(results['before'])}")

    # -- RL -----------------------------------------------------------------------------------
    curve = []
    with _progress(console) as prog:
        bar = prog.add_task("GRPO", total=cfg.run.steps, info="")
        for step in range(cfg.run.steps):
            if stop.requested():
                break
            lr = lr_at(step, cfg.run.steps, cfg.train.lr, cfg.train.lr_schedule, cfg.train.warmup_steps,
                       cfg.train.min_lr_frac)
            trainer.set_lr(lr)
            t0 = time.perf_counter()
            with timers("rollout"):
                groups = step_indices(len(train_q), r.prompts_per_step, cfg.run.seed, step)
                params = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                        max_new_tokens=r.max_new_tokens, stop_token_ids=eos)
                jobs = [Job(g, j, train_q[q], prompt_ids(train_q[q].question),
                            episode_seed(cfg.run.seed, step, g, j))
                        for g, q in enumerate(groups) if g % world.world_size == world.rank
                        for j in range(r.group_size)]
                episodes = run_episodes(engine, env, jobs, params, encode, decode)
                batch = episodes_to_batch(episodes, FINISH_CODES, tok.pad_id or 0)
            batch = compute_advantages(batch, cfg.algo.advantage, norm_std=cfg.algo.norm_std)  # rewards only
            keep = signal_rows(batch, LOSS_MASK)  # [B] False: a group with equal rewards
            n_zero = int((~keep).sum())  # this rank's sequences that carry no signal
            if cfg.algo.dynamic_sampling:  # DAPO: no loss on them (they leave the normalisers)
                batch[LOSS_MASK] = batch[LOSS_MASK] & keep[:, None]
            # Skip what has an exactly-zero gradient: zero-advantage trajectories are not trained
            # and, when the correction only reweights (so their TRAIN_MASK is their LOSS_MASK), not
            # recomputed either; the mismatch diagnostics then cover the recomputed trajectories.
            lean = cfg.train.skip_zero_adv and cfg.algo.kl_coef == 0 and cfg.algo.entropy_coef == 0
            only_signal = lean and cfg.algo.correction in REWEIGHT_ONLY
            with timers("recompute"):
                part = _rows(batch, keep) if only_signal else batch
                part = trainer.recompute(part)
            mismatch = mismatch_metrics(part[ROLLOUT_LOGPROBS], part[OLD_LOGPROBS], part[LOSS_MASK])
            part, _ = apply_correction(part, cfg.algo.correction, cfg.algo.correction_form)
            norm_mask = batch[LOSS_MASK] if only_signal else part[TRAIN_MASK] if lean else None
            if lean and not only_signal:
                part = _rows(part, keep)
            with timers("train"):
                stats = trainer.rl_step(part, agg=cfg.algo.agg, loss=cfg.algo.loss,
                                        loss_kwargs=_loss_kwargs(cfg), kl_coef=cfg.algo.kl_coef,
                                        entropy_coef=cfg.algo.entropy_coef, norm_len=r.max_new_tokens,
                                        norm_mask=norm_mask)
            with timers("publish"):
                publish(trainer, engine, cfg.train.publish_bucket_mb)
                probe_err = probe_check(trainer, engine, probe)
                if cfg.run.verify_publish:
                    timers_extra = {"publish/weights_max_abs": published_weights_diff(trainer, engine, world)}
                else:
                    timers_extra = {}
            ep_stats = _episode_stats(episodes, [j.sample for j in jobs], batch, world, n_zero)
            mm = dict(zip([k.removeprefix("mismatch/") for k in mismatch], [v / world.world_size for v in
                                     all_reduce_sum([float(v) for v in mismatch.values()], world.device)]))
            mm["tokens"] = all_reduce_sum([float(part[LOSS_MASK].sum())], world.device)[0]  # measured on
            gen_tokens = ep_stats["rollout/response_tokens"] * ep_stats["rollout/episodes"]
            wall = time.perf_counter() - t0
            row = {**ep_stats, **{f"mismatch/{k}": v for k, v in mm.items()}, **stats, **timers.pop(),
                   "publish/probe_max_abs": probe_err,
                   "perf/gen_tokens_per_s": gen_tokens / max(1e-9, wall), "time/step": wall,
                   "policy_version": engine.policy_version, "train/lr": lr, **timers_extra}
            log.log(step, row)
            curve.append((step, row["reward/mean"]))
            prog.update(bar, advance=1, info=f"reward {row['reward/mean']:.3f}  searches "
                                             f"{row['env/n_searches']:.2f}  {wall:.1f}s/step")
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < cfg.run.steps:
                ev = evaluate_heldout(f"step{step + 1}")
                log.log(step, {f"eval/{k}": v for k, v in ev.items()})
    rl_steps = len(curve)
    if rl_steps:  # an eval-only run (no RL step) evaluates once: no "after" identical to "before"
        results["after"] = evaluate_heldout("after")
        log.log(rl_steps, {f"eval/{k}": v for k, v in results["after"].items()})
    policy_dir = run_dir / "policy"
    save_policy(trainer, tok, args, policy_dir, world, cfg.train.publish_bucket_mb)
    if world.is_main:
        _summary(console, results, run_dir, curve)
        write_results(run_dir / "results.json", results, rl_steps, cfg, stop.signal, policy_dir)
        if stop.signal:
            console.print(f"[yellow]stopped by {stop.signal} after {rl_steps} of {cfg.run.steps} RL steps[/]; "
                          f"final evaluation, policy and results saved")
        console.print(f"policy: {policy_dir} (HF checkpoint: --model.path={policy_dir} reloads it), "
                      f"results: {run_dir / 'results.json'}")
    log.close()
    shutdown()
    return results


class StopRequest:
    """SIGINT / SIGTERM set a flag that the loops read at step boundaries, so an interrupted run
    still evaluates and saves; a second SIGINT interrupts at once. ``requested()`` agrees on
    every rank (one max all-reduce), so no rank leaves the loop alone and hangs the others."""

    def __init__(self, world: World):
        self.world, self.signal = world, None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: stop now

    def requested(self) -> bool:
        flag = all_reduce_max(int(self.signal is not None), self.world.device)
        if flag and self.signal is None:
            self.signal = "a signal on another rank"
        return bool(flag)


def save_policy(trainer: Trainer, tok: Tokenizer, args, out: Path, world: World, bucket_mb: float) -> None:
    """The trained policy as an HF checkpoint (config.json, safetensors, the tokenizer's files),
    written atomically by the main rank from the trainer's full weights (collective)."""
    state = {}
    for bucket in trainer.full_weights(bucket_mb):  # every trainer rank iterates to the end
        if world.is_main:
            state.update({k: v.detach().clone() for k, v in bucket.items()})
    if world.is_main:
        extra = {n: tok.path / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                           "chat_template.jinja") if (tok.path / n).exists()}
        save_checkpoint(out, args, state, extra_files=extra)


def write_results(path: Path, results: dict, rl_steps: int, cfg: Config, stopped_by: str | None,
                  policy_dir: Path) -> None:
    """The run's final figures as JSON (atomic: a temporary file, then rename)."""
    out = {"evaluations": results, "rl_steps": rl_steps, "rl_steps_configured": cfg.run.steps,
           "stopped_by": stopped_by, "policy": str(policy_dir), "held_out_questions": cfg.task.eval_questions}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)


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


def publish(trainer: Trainer, engine: Engine, bucket_mb: float, version: int | None = None) -> int:
    """Trainer's full weights -> this rank's engine, bucket by bucket (colocated: a local copy
    after the FSDP all-gather; no disk, no RPC)."""
    return engine.update_weights(trainer.full_weights(bucket_mb), version=version)


def published_weights_diff(trainer: Trainer, engine: Engine, world: World) -> float:
    """max |engine weight - trainer full weight| over all parameters and ranks."""
    params = dict(engine.model.named_parameters())
    worst = 0.0
    for bucket in trainer.full_weights():
        for name, t in bucket.items():
            worst = max(worst, float((params[name] - t).abs().max()))
    if world.distributed:
        w = torch.tensor([worst], dtype=torch.float64, device=world.device)
        torch.distributed.all_reduce(w, op=torch.distributed.ReduceOp.MAX)
        worst = float(w)
    return worst


def probe_check(trainer: Trainer, engine: Engine, probe: list[int], n: int = 8) -> float:
    """max |engine logprob - trainer logprob| over a greedy continuation of a fixed probe prompt."""
    out = engine.generate([Request(("probe", engine.policy_version), probe,
                                   SamplingParams(temperature=0.0, max_new_tokens=n))])[0]
    with torch.no_grad():
        lp, _ = sequence_logprobs(trainer.model, torch.tensor([out.tokens], device=engine.device))
    gen = torch.tensor(out.generated)
    return float((lp[0].cpu()[gen] - torch.tensor(out.logprobs)[gen]).abs().max())


def evaluate(engine: Engine, env, questions, prompt_ids, encode, decode, eos, cfg: Config,
             world: World, examples: list | None = None) -> dict[str, float]:
    """Greedy episodes on held-out questions (sharded over ranks): exact match, searches, length."""
    mine = [(i, q) for i, q in enumerate(questions) if i % world.world_size == world.rank]
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=eos)
    jobs = [Job(i, 0, q, prompt_ids(q.question), 0) for i, q in mine]
    eps = run_episodes(engine, env, jobs, params, encode, decode) if jobs else []
    hits, known = _retrieval_hits(eps, [j.sample for j in jobs])
    sums = [sum(e.info.get("em", 0.0) for e in eps), sum(e.info.get("f1", 0.0) for e in eps),
            sum(e.info.get("n_searches", 0) for e in eps), sum(sum(e.out.generated) for e in eps), len(eps),
            hits, known]
    em, f1, searches, tokens, n, hits, known = all_reduce_sum(sums, world.device)
    n = max(n, 1)
    if examples is not None:
        examples.extend({"episode": e, "question": questions[e.group]} for e in eps)
    out = {"exact_match": 100 * em / n, "f1": 100 * f1 / n, "searches": searches / n,
           "response_tokens": tokens / n, "questions": n}
    if known:
        out["retrieval_hit"] = 100 * hits / known
    return out


def _example_line(e, q, decode) -> str:
    """One held-out episode as a JSON line: what the policy actually wrote, for reading."""
    return json.dumps({"id": q.id, "question": q.question, "gold": q.answers, "answer": e.info.get("answer"),
                       "reward": e.reward, "retrieved": e.info.get("retrieved"), **q.meta,
                       "text": decode(e.out.tokens[e.out.prompt_len:])})


def _retrieval_hits(episodes, samples) -> tuple[float, float]:
    """(episodes whose searches retrieved their question's gold document, episodes whose question
    names one): where the agent fails, searching or reading. Task rows carry ``doc_id``."""
    hits = known = 0
    for e, q in zip(episodes, samples):
        doc = q.meta.get("doc_id") if hasattr(q, "meta") else None
        if doc is not None:
            known += 1
            hits += doc in e.info.get("retrieved", ())
    return float(hits), float(known)


def _rows(batch, keep: torch.Tensor):
    """``batch[keep]``, or one loss-free row when nothing is kept (the collectives in the trainer's
    forward and backward need every rank to run)."""
    return batch[keep] if bool(keep.any()) else loss_free(batch[:1])


def _loss_kwargs(cfg: Config) -> dict:
    if cfg.algo.loss in ("ppo", "gspo", "gspo_token", "cispo"):
        return {"eps_low": cfg.algo.eps_low, "eps_high": cfg.algo.eps_high}
    return {}


def _episode_stats(episodes, samples, batch, world: World, n_zero: int) -> dict[str, float]:
    """Episode statistics over every rank's episodes (sums in one all-reduce, then means)."""
    n = len(episodes)
    sums = [float(n_zero), *_retrieval_hits(episodes, samples),
        float(batch[REWARD].sum()), sum(e.info.get("em", 0.0) for e in episodes),
        sum(e.info.get("f1", 0.0) for e in episodes), sum(e.info.get("n_searches", 0) for e in episodes),
        sum(e.info.get("n_errors", 0) for e in episodes), float(batch[LOSS_MASK].sum()),
        float(batch[SEQ_LEN].sum()), sum(e.info.get("finish") == "answer" for e in episodes), n,
    ]
    zero, hits, known, reward, em, f1, searches, errors, resp, seqlen, answered, n = all_reduce_sum(sums, world.device)
    n = max(n, 1)
    return {**({"env/retrieval_hit": hits / known} if known else {}),"reward/mean": reward / n, "env/em": em / n, "env/f1": f1 / n, "env/n_searches": searches / n,
            "env/n_errors": errors / n, "env/answered": answered / n, "rollout/response_tokens": resp / n,
            "rollout/seq_len": seqlen / n, "rollout/episodes": n, "rollout/zero_adv_seqs": zero}


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)


def _fmt(ev: dict[str, float]) -> str:
    return (f"exact match {ev['exact_match']:.1f}%, {ev['searches']:.2f} searches/question, "
            f"{ev['response_tokens']:.1f} response tokens ({int(ev['questions'])} questions)")


def _summary(console: Console, results, run_dir: Path, curve) -> None:
    table = Table(title="held-out search questions (greedy)")
    hit = all("retrieval_hit" in ev for ev in results.values())
    for col in ("", "exact match %", "F1 %", "searches / question", "response tokens") + (
            ("gold doc retrieved %",) if hit else ()):
        table.add_column(col, justify="right")
    labels = {"before": "before RL", "after": "after RL"} if "after" in results else {"before": "policy (no RL)"}
    for name, label in labels.items():
        ev = results[name]
        table.add_row(label, f"{ev['exact_match']:.1f}", f"{ev['f1']:.1f}", f"{ev['searches']:.2f}",
                      f"{ev['response_tokens']:.1f}", *((f"{ev['retrieval_hit']:.1f}",) if hit else ()))
    console.print(table)
    if curve:
        evals = {k: (len(curve) if k == "after" else 0, v["exact_match"]) for k, v in results.items()}
        plot_reward_curve(run_dir / "reward_curve.png", curve, evals)
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}" + (f", curve: {run_dir / 'reward_curve.png'}" if curve else ""))
