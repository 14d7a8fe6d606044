"""The controller: the whole dataflow of a run, executed by every rank; a rank does the phases of
its roles (``Plan.rollout_enabled``, ``trainer_enabled``) and the collectives that connect them.

    run:   plan -> task (the environment) -> tokenizer, policy -> roles -> publish
           -> SFT warm-start (trainer ranks) -> evaluate -> RL steps -> evaluate, save, report
    step:  episodes  = generate(prompts, env)         rollout mesh: multi-turn, per-token logprobs, rewards
           batch     = to_trainer(episodes)           colocated: local; disaggregated: the bridge group
           batch     = advantages(batch)              GRPO: the rewards of each group
           batch     = trainer.recompute(batch)       pi_old (and pi_ref); the lean step skips rows
           batch     = apply_correction(batch)        TIS / MIS / IcePop ...
           stats     = trainer.rl_step(batch)         mini-batches x epochs, micro-batches
                       (one update: fused_step, pi_old from the training forward, no recompute)
           mismatch  = mismatch_metrics(batch)        trainer vs engine, every step
           publish(trainer -> rollout)                local copy, or bucketed broadcast
           metrics.log(step, ...)

Colocated: every role on every rank; each rank trains the groups it generated. Disaggregated
(``run.placement``): rollout ranks generate and send finished groups (``sidpt.dist.transfer``),
trainer ranks train and broadcast the new weights, synchronously: the rollout ranks have the new
weights before they start the next step. ``run.pipeline = "async"``: the same step body on the
trainer ranks (``train_async``), whose batch ``sidpt.schedule`` picks from the trajectories the
rollout ranks stream while they keep generating (``stream_rollouts``) under
``rollout.max_staleness``, taking new weights between decode steps (docs/async.md).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sidpt.batch import (
    ADVANTAGES, FINISH_ERROR, LOSS_MASK, OLD_LOGPROBS, REF_LOGPROBS, ROLLOUT_LOGPROBS, SEQ_LEN, trajectories_to_batch,
)
from sidpt.checkpoint import (
    PIPELINE, hf_files, load_training_state, newest_checkpoint, save_policy, save_training_state,
)
from sidpt.config import Config, ConfigError
from sidpt.data import episode_seed, step_indices
from sidpt.dist.plan import Plan, build_plan
from sidpt.dist.stream import STOP, GroupClaims, TrajectoryReceiver, TrajectorySender, WeightReceiver, publish_version
from sidpt.dist.transfer import (
    broadcast_weights, join_rows, receive_weights, recv_groups, recv_rows, request_ref_logprobs, send_groups,
    send_rows, serve_ref_logprobs,
)
from sidpt.dist.world import (
    World, all_reduce_max, all_reduce_sum, barrier, gather_to_main, init_world, shutdown, world_group,
)
from sidpt.env import load_environment, load_reward, score
from sidpt.env.base import FINISH_CODES
from sidpt.env.guard import Guard, GuardedEnv
from sidpt.evaluate import describe, evaluate, reduce_metrics, summary, write_results
from sidpt.flops import Peaks, device_peaks, forward_cost, param_count, train_cost
from sidpt.metrics import MetricsLog, Timers
from sidpt.model import Transformer
from sidpt.model.model import compute_dtype, count_params
from sidpt.model.numerics import check_invariance
from sidpt.reference import Reference
from sidpt.rl import REWEIGHT_ONLY, Correction, apply_correction, compute_advantages, dynamic_sampling, mismatch_metrics
from sidpt.rollout import Engine, EngineConfig, Request, SamplingParams
from sidpt.rollout.speculative import SpeculativeEngine
from sidpt.rollout.multiturn import EpisodeRunner, Job, episode_trajectory, episodes_to_batch, run_episodes
from sidpt.schedule import PipelineState, lookahead
from sidpt.sft import sft_rows, warm_start
from sidpt.startup import (
    StopRequest, fit_samples, load_policy, prompt_encoder, report_skipped_rows, set_threads, start_run, threads_note,
)
from sidpt.telemetry import GpuSampler, Trace, parse_steps, write_trace
from sidpt.trainer import OptimConfig, Trainer, lr_at, sequence_logprobs, signal_rows
from sidpt.utilisation import (
    StepWork, add_model_phase, add_trained, rlu_row, share, usefulness, utilisation_table, weighted_mask,
)


@dataclass
class Run:
    """What every phase needs; ``trainer`` is None off the trainer mesh, ``engine`` off the rollout mesh."""

    cfg: Config
    world: World
    plan: Plan
    console: Console
    run_dir: Path
    task: Any
    tok: Any
    prompt_ids: Callable
    trainer: Trainer | None
    engine: Engine | None
    reference: Reference | None  # on reference ranks of their own only
    log: MetricsLog
    stop: StopRequest
    reward_fn: Callable | None
    timers: Timers
    guard: Guard  # environment and reward calls, isolated (task.faults)
    resumed_from: Path | None = None  # the checkpoint this run resumed from (``resume``)
    peaks: Peaks | None = None  # this rank's device peaks (``flops.device_peaks``), for the utilisation figures
    work: StepWork = field(default_factory=StepWork)  # this rank's accounts of the current step (docs/rlu.md)
    run_work: StepWork = field(default_factory=StepWork)  # every rank's, summed over the RL steps so far
    run_ess: tuple[float, float] = (0.0, 0.0)  # sum of eta_ess x loss tokens, loss tokens: the run's eta_ess
    loop_s: float = 0.0  # the main rank's time in the RL steps' loop (the run's devices x wall)
    gen_share: float | None = None  # the run's generation share (async: the samples trained of those generated)
    trace: Trace | None = None  # this rank's phase spans of ``run.trace_steps`` (trace.json)
    gpu: GpuSampler | None = None  # this rank's GPU readings (a GPU with pynvml; ``run.telemetry_s``)


def run(cfg: Config) -> dict[str, dict[str, float]]:
    world = init_world()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world.world_size))
    threads = set_threads(cfg.run.threads, local_ranks)
    plan = build_plan(world, cfg.run.placement, cfg.run.rollout_ranks, cfg.run.reference_ranks)
    check_degrees(cfg, plan)
    console, run_dir = start_run(cfg, world)
    env_module, env_cfg = load_environment(cfg.env)
    task = env_module.make_task(env_cfg, world.is_main, need_sft=cfg.sft.steps > 0)
    guard = Guard(cfg.task.faults, cfg.task.call_timeout_s, run_dir / f"faults_rank{world.rank}.jsonl", console.print)
    task.env = GuardedEnv(task.env, guard)
    report_skipped_rows(task, run_dir, world.is_main, console)
    check_speculative(cfg, task)
    tok, policy = load_policy(cfg, task, world)
    prompt_ids = prompt_encoder(cfg, task, tok)
    fit_samples(cfg, task, prompt_ids, console)
    r = Run(cfg, world, plan, console, run_dir, task, tok, prompt_ids, *build_roles(cfg, plan, policy, tok),
            MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main), StopRequest(world),
            load_reward(cfg.task.reward), Timers(), guard)
    console.print(f"[bold]sidpt[/] {world.world_size} rank(s), {plan.placement} (rollout {plan.rollout_ranks}, "
                  f"trainer {plan.trainer_ranks}); env {cfg.env['name']}; model {policy.args.family} "
                  f"{count_params(policy) / 1e6:.2f}M params, vocab {policy.args.vocab_size}; run dir {run_dir}")
    console.print(threads_note(threads, local_ranks))
    start_instruments(r)  # device peaks, the timeline, the GPU sampler
    publish(r, version=0)
    start = resume(r)  # the RL steps a checkpoint already holds (run.resume; 0: a fresh run)
    if cfg.sft.steps and not start:
        if r.trainer:
            rows = sft_rows(task, prompt_ids, tok, cfg.sft.n_trajectories, cfg.run.seed)
            with _progress(console, "SFT warm-start", cfg.sft.steps) as bar:
                warm_start(r.trainer, rows, cfg, plan.trainer_dp, tok.pad_id or 0, r.log, r.stop, bar)
        else:
            console.print(f"SFT warm-start: {cfg.sft.steps} steps on the trainer ranks {plan.trainer_ranks}")
        replay_sft_rows(r)
        publish(r, version=0)  # version 0: the policy RL starts from (step s samples with version s)
        sync_reference(r)
    first = "resumed" if start else "before"
    results = {first: evaluate_heldout(r, first, start)}
    if world.is_main:  # the main rank rolls out in every placement: it holds the evaluation
        console.print(f"held-out {'at resume (step ' + str(start) + ')' if start else 'before RL'}: "
                      f"{describe(results[first], task.eval_columns)}")
    with _progress(console, "GRPO", cfg.run.steps - start) as bar:
        curve = async_steps(r, bar, start) if cfg.run.pipeline == "async" else sync_steps(r, bar, start)
    if curve:  # an eval-only run (no RL step) evaluates once: no "after" identical to "before"
        results["after"] = evaluate_heldout(r, "after", curve[-1][0] + 1)
    finish(r, results, curve, policy.args, curve[-1][0] + 1 if curve else start)
    return results


def start_instruments(r: Run) -> None:
    """Every rank measures its device's peaks (at once: what each can do while all run; the
    engine's roofline time uses them), starts its timeline (``run.trace_steps``) and, on a GPU,
    its pynvml sampler (``run.telemetry_s``)."""
    r.peaks = device_peaks(r.world.device)
    if r.engine is not None and hasattr(r.engine, "peaks"):
        r.engine.peaks = r.peaks  # the engine's roofline time (perf/gen_roofline_frac)
    r.console.print(f"device peak: {r.peaks.flops / 1e9:.1f} GFLOP/s, {r.peaks.bytes / 1e9:.1f} GB/s "
                    f"({r.peaks.source})")
    r.trace = r.timers.trace = r.guard.trace = Trace(r.world.rank, parse_steps(r.cfg.run.trace_steps))
    r.gpu = GpuSampler.start(r.world.device, r.cfg.run.telemetry_s, r.trace)


def sync_steps(r: Run, bar, start: int = 0) -> list[tuple[int, float]]:
    """The synchronous RL steps (colocated, or disaggregated with ``run.pipeline = "sync"``) from
    ``start``, with a training checkpoint every ``run.checkpoint_every`` steps."""
    curve, cfg, t0 = [], r.cfg, time.perf_counter()
    for step in range(start, cfg.run.steps):
        if r.stop.requested():
            break
        r.trace.at(step)
        row = rl_step(r, step)  # complete on the main rank
        r.log.log(step, row)
        curve.append((step, row.get("reward/mean", 0.0)))
        bar(info=f"reward {curve[-1][1]:.3f}  {row['time/step']:.1f}s/step")
        if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and step + 1 < cfg.run.steps:
            evaluate_heldout(r, f"step{step + 1}", step)
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0 and r.trainer:
            save_training_state(r.trainer, r.run_dir, step + 1, cfg.run.keep_checkpoints, r.world.rank,
                                r.world.rank == r.plan.main_trainer, r.trainer.group, hf=checkpoint_hf_files(r))
        kill_switch(r, step)
    r.loop_s = time.perf_counter() - t0
    return curve


def kill_switch(r: Run, step: int) -> None:
    """Fault injection (``run.kill_rank`` / ``run.kill_step``; tests/spine/test_resume.py,
    tools/fault_drill.py): SIGKILL this rank after ``step``, on the job's first attempt only."""
    if (r.world.rank, step) == (r.cfg.run.kill_rank, r.cfg.run.kill_step) and \
            os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def resume(r: Run) -> int:
    """``run.resume = "auto"``: the newest complete checkpoint into the trainer (model, AdamW,
    RNG) and, through ``publish``, every engine; returns its step (0: none, or not resuming).
    Every rank reads the same files (one node, or a shared file system) and agrees on the step."""
    if r.cfg.run.resume != "auto":
        return 0
    path = newest_checkpoint(r.run_dir, r.console.print)
    if path is None:
        return 0
    step = (load_training_state(r.trainer, path, r.world.rank, r.trainer.group) if r.trainer
            else int(json.loads((path / "controller.json").read_text())["step"]))
    r.console.print(f"resumed from {path}: {step} RL steps done")
    r.resumed_from = path
    publish(r, version=step)
    return step


def rl_step(r: Run, step: int) -> dict[str, float]:
    """One RL step (the module docstring's step); returns its metrics row (complete on the main rank)."""
    cfg, plan, t0 = r.cfg, r.plan, time.perf_counter()
    episodes, batch, stats, r.work = [], None, {}, StepWork()
    if plan.rollout_enabled:
        work, env0 = dict(r.engine.stats), r.guard.seconds  # the engine's FLOPs and bytes so far, the env's time
        with r.timers("rollout"):
            episodes = score(generate(r, step), r.reward_fn, r.tok.decode, r.guard)
            batch = episodes_to_batch(episodes, FINISH_CODES, r.tok.pad_id or 0) if episodes else None
        account_rollout(r, work, r.guard.seconds - env0)
    if plan.rollout_enabled or (plan.disaggregated and plan.trainer_enabled):
        sync_point(r, plan.bridge if plan.disaggregated else plan.group_of(plan.rollout_mesh))
    with r.timers("transfer"):
        batch = to_trainer(batch, plan)
    if plan.own_reference and plan.reference_enabled:
        serve_reference(r)
    if plan.trainer_enabled:
        with r.timers("trainer"):
            stats = train(r, batch, lr_at(step, cfg.run.steps, cfg.train.lr, cfg.train.lr_schedule,
                                          cfg.train.warmup_steps, cfg.train.min_lr_frac))
        sync_point(r, r.trainer.group)
    if plan.disaggregated and (plan.rollout_enabled or r.world.rank == plan.main_trainer):
        sync_point(r, plan.weight_group)
    with r.timers("publish"):
        stats.update(publish(r, measure=True))
    wall = time.perf_counter() - t0
    r.trace.span("step", t0, t0 + wall, step)
    stats.update(step_utilisation(r, wall, stats))
    stats.update(gpu_telemetry(r, world_group()))
    return step_row(r, episodes, stats, wall, work if plan.rollout_enabled else None)


# -- utilisation (docs/rlu.md) ---------------------------------------------------------------


def gpu_telemetry(r: Run, group) -> dict[str, float]:
    """The step's GPU readings (``GpuSampler.pop``) over ``group``: utilisation, power and clock
    averaged over the ranks that read any, memory maxed. {} on a CPU (every rank has the same
    kind of device, so every rank skips the collectives alike)."""
    if r.world.device.type != "cuda":
        return {}
    g = r.gpu.pop() if r.gpu is not None else {}
    keys = ("gpu/util_pct", "gpu/power_w", "gpu/sm_clock_mhz", "gpu/samples")
    sums = all_reduce_sum([float(bool(g))] + [g.get(k, 0.0) for k in keys], r.world.device, group)
    mem = all_reduce_max([g.get("gpu/mem_gib_max", 0.0)], r.world.device, group)[0]
    if not sums[0]:
        return {}
    out = {k: v / sums[0] for k, v in zip(keys[:3], sums[1:4])}
    out.update({"gpu/samples": sums[4], "gpu/mem_gib_max": mem})
    return out


def sync_point(r: Run, group) -> None:
    """A barrier on ``group``, timed as the waterfall's "idle": waiting for its slowest rank at
    one of the step's sync points (waiting inside a phase's own collectives stays that phase's)."""
    with r.timers("idle"):
        barrier(group)


def account_rollout(r: Run, before: dict, env_s: float) -> None:
    """The rollout's accounts: environment and reward calls (``Guard.seconds``), the engine's
    roofline time (the rest of the rollout time is "generate", filled in by ``step_utilisation``)."""
    roof = r.engine.stats.get("roofline_s", 0.0) - before.get("roofline_s", 0.0)  # 0: the speculative engine
    r.work.add("environment", env_s)
    r.work.add("generate", -env_s, roofline=roof)


def publish_roofline(r: Run) -> float:
    """A publish's memory traffic at the peak bandwidth: every parameter read and written on a
    colocated rank, read (sender) or written (receiver) once on a disaggregated one."""
    model = r.trainer.model if r.trainer else r.engine.model
    elem = next(model.parameters()).element_size()
    return (1 if r.plan.disaggregated else 2) * param_count(model.args) * elem / r.peaks.bytes


def run_utilisation(r: Run) -> dict[str, float]:
    """RLU and the waterfall over the run's RL steps: every rank's accounts summed over the steps
    (``run_work``), the time between steps (devices x the loop's time - the steps' device time)
    as its own share, eta_ess the token-weighted mean of the steps'. {} without an RL step."""
    w = r.run_work
    if w.wall <= 0:
        return {}
    between = max(0.0, r.world.world_size * r.loop_s - w.wall)
    return rlu_row(w, r.run_ess[0] / max(r.run_ess[1], 1e-12), r.gen_share, between)


def step_utilisation(r: Run, wall: float, stats: dict[str, float]) -> dict[str, float]:
    """The step's waterfall and RLU over every rank (``reduce_work`` over the world)."""
    total, ess, n_tok = reduce_work(r, wall, stats, world_group())
    r.run_work = r.run_work + total
    r.run_ess = (r.run_ess[0] + ess * n_tok, r.run_ess[1] + n_tok)
    return rlu_row(total, ess if n_tok else 1.0)  # no loss token: no weight, no loss of samples


def reduce_work(r: Run, wall: float, stats: dict[str, float], group) -> tuple[StepWork, float, float]:
    """This rank's step accounts from its timers and ``r.work``, summed over ``group``, with
    eta_ess and the loss tokens from the main trainer rank (``mismatch/ess_weight``, ``/tokens``)."""
    t, w = r.timers.times, r.work
    for phase in ("transfer", "recompute", "idle"):
        w.add(phase, t.get(phase, 0.0))
    w.add("train", t.get("trainer", 0.0) - t.get("recompute", 0.0))  # the update, advantages, diagnostics
    w.add("idle", t.get("wait", 0.0))  # the async trainer waits for trajectories
    w.add("generate", t.get("rollout", 0.0))
    w.add("reference", t.get("reference", 0.0))
    took_part = r.plan.trainer_enabled or r.plan.rollout_enabled  # reference ranks take no part in a publish
    w.add("publish", t.get("publish", 0.0), roofline=publish_roofline(r) if took_part else 0.0)
    w.wall = wall
    w.role = rank_role(r.plan, r.world.rank)
    main = r.world.rank == r.plan.main_trainer
    v = all_reduce_sum(w.vector() + [stats.get("mismatch/ess_weight", 0.0) if main else 0.0,
                                     stats.get("mismatch/tokens", 0.0) if main else 0.0],
                       r.world.device, group)
    return StepWork.from_vector(v[:-2]), v[-2], v[-1]


def generate(r: Run, step: int) -> list:
    """This rollout rank's share of the step's prompt groups (a pure function of seed and step:
    no broadcast), run to the end of their episodes."""
    c, (dp_rank, dp_size) = r.cfg.rollout, r.plan.rollout_dp
    jobs = [job for g in range(c.prompts_per_step) if g % dp_size == dp_rank for job in group_jobs(r, step, g, g)]
    return run_episodes(r.engine, r.task.env, jobs, sampling_params(r), r.tok.encode, r.tok.decode)


def group_jobs(r: Run, step: int, g: int, group_id: int) -> list[Job]:
    """The G episodes of group ``g`` of ``step`` (its prompt and seeds depend on nothing else)."""
    c = r.cfg.rollout
    q = step_indices(len(r.task.train), c.prompts_per_step, r.cfg.run.seed, step)[g]
    sample = r.task.train[q]
    return [Job(group_id, j, sample, r.prompt_ids(sample), episode_seed(r.cfg.run.seed, step, g, j))
            for j in range(c.group_size)]


def sampling_params(r: Run) -> SamplingParams:
    c = r.cfg.rollout
    eos = () if r.tok.eos_id is None else (r.tok.eos_id,)
    return SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens,
                          stop_token_ids=eos)


# -- the async pipeline (run.pipeline = "async", disaggregated) ---------------------------------


def async_steps(r: Run, bar, start: int = 0) -> list[tuple[int, float]]:
    """The async pipeline from step ``start``: rollout ranks stream episodes (``stream_rollouts``)
    while the trainer ranks train (``train_async``); at the end the main rank logs the merged rows,
    step by step (a resumed run's earlier steps: the trainer's rows, from the checkpoint)."""
    plan, out, done, t0 = r.plan, [], 0, time.perf_counter()  # done: the RL steps trained (every rank learns it)
    if plan.rollout_enabled:
        rows = stream_rollouts(r, bar, start)
        out, done = [("rollout", rows)], max(rows, default=0)
    elif plan.trainer_enabled:
        done = train_async(r, start)
        if r.world.rank == plan.main_trainer:
            out = [("trainer", [dict(row) for row in r.log.rows if "policy_version" in row])]  # the steps' rows
    merged, trainer_rows = RolloutState(), []
    for kind, rows in gather_to_main(out, r.world, plan.bridge):
        if kind == "trainer":
            trainer_rows = rows
        for version, sums in (rows.items() if kind == "rollout" else ()):
            merged.add(version, sums)
    curve, rollout = [], {v: rollout_work(sums) for v, sums in merged.rows.items()}
    works = [StepWork.from_vector([row.pop(f"_work/{i}", 0.0) for i in range(len(StepWork().vector()))])
             for row in trainer_rows]
    trained = sum(works, StepWork())
    generated = sum(sums.get("work/generated_len", 0.0) for sums in merged.rows.values())
    kept = min(1.0, trained.total_len / generated) if generated else 1.0  # the rest: dropped, aborted, unused
    for row, work in zip(trainer_rows, works):  # main rank only (the others received nothing)
        step = int(row.pop("step"))
        sums = merged.rows.get(step, {})  # what the rollout ranks did while holding version `step`
        row.update({k: v[0] / v[1] for k, v in sums.items() if isinstance(v, tuple) and v[1] > 0})
        busy, idle = sums.get("time/rollout_busy", 0.0), sums.get("time/rollout_idle", 0.0)
        row.update({k: v for k, v in sums.items() if not isinstance(v, tuple) and not k.startswith("work/")})
        row["perf/rollout_idle_frac"] = idle / max(busy + idle, 1e-9)
        total = work + rollout.pop(step, StepWork())
        n_tok = row.get("mismatch/tokens", 0.0)
        ess = row.get("mismatch/ess_weight", 1.0) if n_tok else 1.0
        row.update(rlu_row(total, ess, gen_share=share(work) * kept))
        r.run_work, r.run_ess = r.run_work + total, (r.run_ess[0] + ess * n_tok, r.run_ess[1] + n_tok)
        r.log.log(step, row)
        curve.append((step, row.get("reward/mean", 0.0)))
    r.run_work = sum(rollout.values(), r.run_work)  # the rollout ranks' time in versions no step trained on
    r.gen_share, r.loop_s = share(trained) * kept, time.perf_counter() - t0
    return curve if r.world.is_main else [(step, 0.0) for step in range(done)]


def rollout_work(sums: dict) -> StepWork:
    """The rollout ranks' accounts of one version (``stream_rollouts``' work/* sums)."""
    w = StepWork(wall=sums.get("work/wall", 0.0), role="rollout")
    for phase in ("generate", "environment", "transfer", "publish", "schedule", "idle"):
        w.add(phase, sums.get(f"work/{phase}", 0.0))
    w.add("generate", roofline=sums.get("work/roofline_generate", 0.0))
    w.add("publish", roofline=sums.get("work/roofline_publish", 0.0))
    return w


@dataclass
class RolloutState:
    """A rollout rank's side of the async pipeline, explicit (what a pipeline checkpoint holds with
    the runner's jobs): the group claimed next and the sums logged per version."""

    claimed: tuple | None = None  # the next unit this rank runs (``GroupClaims.next``), waiting for recent enough weights
    rows: dict[int, dict] = field(default_factory=dict)  # version -> name -> (sum, count) or total

    def add(self, version: int, sums: dict) -> None:
        acc = self.rows.setdefault(version, {})
        for k, v in sums.items():
            acc[k] = (acc.get(k, (0.0, 0.0))[0] + v[0], acc.get(k, (0.0, 0.0))[1] + v[1]) if isinstance(v, tuple) \
                else acc.get(k, 0.0) + v


def stream_rollouts(r: Run, bar, start: int = 0) -> dict[int, dict]:
    """A rollout rank of the async pipeline. Group ``i`` (group ``i % B`` of step ``i // B``, the
    synchronous run's prompts and seeds; which rank runs it: ``rollout.assign``) starts once this
    rank holds weights no older than ``lookahead`` versions before its step; the engine steps; every ended episode is sent at once;
    new weights are taken between engine steps (``take_weights``). Waits only when no group may
    start. Resumed (``start`` > 0), it first runs the samples the checkpoint lacks (docs/async.md,
    "Checkpoints"). Returns its rows by version (the last one: the steps the trainer trained)."""
    cfg, c, plan, engine = r.cfg, r.cfg.rollout, r.plan, r.engine
    B, (dp, R) = c.prompts_per_step, plan.rollout_dp
    ahead = lookahead(cfg.train.schedule, c.max_staleness)
    runner = EpisodeRunner(engine, r.task.env, sampling_params(r), r.tok.encode, r.tok.decode)
    weights = WeightReceiver(engine.model, cfg.train.publish_bucket_mb, plan.main_trainer, plan.weight_group)
    sender, state = TrajectorySender(plan.main_trainer, plan.stream_groups[dp]), RolloutState()
    saved = torch.load(r.resumed_from / PIPELINE, weights_only=True) if r.resumed_from else {"redo": [], "first": 0}
    claims = GroupClaims(c.assign, B, dp, R, c.max_staleness, saved["redo"], saved["first"],
                         attempt=f"{start}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    share = -(-(ahead + 1) * B // R) * c.group_size  # its share of the groups the bound lets start
    delay = cfg.run.delay_s if r.world.rank == cfg.run.delay_rank else 0.0
    lap = Lap(r.trace)  # every second of the loop goes to one phase of the version held (work/*: the waterfall)
    r.trace.at(engine.policy_version)
    while True:
        # start what the bound allows: the next group this rank runs, once its weights are recent
        # enough, while this rank runs less than its share and keeps pace (``GroupClaims.may_claim``)
        while (len(runner.jobs) < share and claims.may_claim()) or state.claimed is not None:
            if state.claimed is None:
                state.claimed = claims.next()
            i, samples = state.claimed
            if i // B > engine.policy_version + ahead:
                break
            for job in group_jobs(r, i // B, i % B, i):
                if samples is None or job.index in samples:
                    runner.add(job)
            claims.started(i)
            state.claimed = None
        state.add(engine.policy_version, lap.phase("schedule"))  # claims and bookkeeping
        t0 = time.perf_counter()
        version = weights.poll(timeout=0.0 if runner.has_work() else None)  # blocks only when idle
        if not runner.has_work():
            state.add(engine.policy_version, {"time/rollout_idle": time.perf_counter() - t0})
        state.add(engine.policy_version, lap.phase("idle"))
        if version == STOP:
            break
        if version is not None:
            claims.version()
            state.add(engine.policy_version, take_weights(r, weights, runner, version))
            state.add(engine.policy_version, {**lap.phase("publish"), "work/roofline_publish": publish_roofline(r)})
            r.trace.at(engine.policy_version)
            if (g := r.gpu.pop() if r.gpu is not None else {}):  # this rank's GPU while it held the old version
                state.add(version - 1, {f"gpu/rollout_{k.removeprefix('gpu/')}": (v, 1.0) for k, v in g.items()
                                        if k != "gpu/samples"})
            bar(info=f"version {version}")
            continue
        t0, env0, roof0 = time.perf_counter(), r.guard.seconds, engine.stats.get("roofline_s", 0.0)
        episodes = score(runner.step(), r.reward_fn, r.tok.decode, r.guard)
        sums = {"work/roofline_generate": engine.stats.get("roofline_s", 0.0) - roof0,
                "work/environment": r.guard.seconds - env0}
        t1 = time.perf_counter()
        for e in episodes:
            sender.send(episode_trajectory(e, FINISH_CODES.get(e.info.get("finish"), FINISH_ERROR)))
            claims.finished(e.key[0], group_done=not any(key[0] == e.key[0] for key in runner.jobs))
        sums["work/transfer"] = time.perf_counter() - t1
        if delay:
            time.sleep(delay)
        sums["time/rollout_busy"] = time.perf_counter() - t0
        if episodes:
            n = float(len(episodes))
            sums.update({f"env/{k}": v for k, v in r.task.metrics(episodes).items()})
            sums.update({"reward/sampled_mean": (sum(e.reward for e in episodes), n),
                         "rollout/response_tokens": (float(sum(sum(e.out.generated) for e in episodes)), n),
                         "rollout/episodes": n, "rollout/faults": float(sum("fault" in e.info for e in episodes)),
                         "work/generated_len": float(sum(len(e.out.tokens) for e in episodes))})
        busy = lap.phase("generate")  # the engine step, less the environment's and the sends' time
        busy["work/generate"] -= sums["work/environment"] + sums["work/transfer"]
        state.add(engine.policy_version, {**sums, **busy})
    state.add(engine.policy_version, {"rollout/aborted_at_end": float(runner.abort())})
    sender.close()
    weights.thread.join()
    return state.rows


class Lap:
    """Consecutive laps of a loop: ``phase(name)`` returns {"work/<name>": seconds since the last
    lap, "work/wall": the same} (a rollout rank's waterfall in the async pipeline), and traces it."""

    def __init__(self, trace: Trace):
        self.t, self.trace = time.perf_counter(), trace

    def phase(self, name: str) -> dict[str, float]:
        now = time.perf_counter()
        d, t0, self.t = now - self.t, self.t, now
        self.trace.span(name, t0, now)
        return {f"work/{name}": d, "work/wall": d}


def take_weights(r: Run, weights: WeightReceiver, runner: EpisodeRunner, version: int) -> dict[str, float]:
    """New weights between engine steps. Running requests go on with them (``rollout.inflight =
    "continue"``, their KV cache kept or dropped for recompute by ``rollout.inflight_kv``) or start
    again from the prompt (``"requeue"``)."""
    c, engine = r.cfg.rollout, r.engine
    weights.take(engine)  # the newest version (``version`` or one published since)
    out = {"rollout/inflight_updates": float(bool(runner.jobs))}
    if runner.jobs and c.inflight == "requeue":
        out["rollout/requeued"] = float(runner.restart())
    elif runner.jobs and c.inflight_kv == "recompute":
        out["rollout/kv_recompute_tokens"] = float(engine.drop_cache())
    return out


def train_async(r: Run, start: int = 0) -> int:
    """The trainer ranks of the async pipeline from step ``start``: per step, the main trainer
    rank's ``PipelineState`` chooses the batch from the trajectories streamed so far
    (``train.schedule``, waiting only when the policy must), the batch is split over the trainer
    ranks by group, trained as in the synchronous run (``train``), and the new version published;
    its rows stay in memory. Checkpoints hold the pipeline too (``checkpoint_async``)."""
    cfg, plan, c = r.cfg, r.plan, r.cfg.rollout
    main = r.world.rank == plan.main_trainer
    group = plan.group_of(plan.trainer_mesh)
    pipe = PipelineState(cfg.train.schedule, c.prompts_per_step, c.group_size, c.max_staleness,
                         cfg.train.bias_window) if main else None
    rx = TrajectoryReceiver(plan.rollout_ranks, plan.stream_groups) if main else None
    if main and r.resumed_from:  # the schedule's state and the trainer's rows so far
        saved = torch.load(r.resumed_from / PIPELINE, weights_only=True)
        pipe.load_state_dict(saved["schedule"])
        r.log.rows.extend(saved["rows"])
        restored = {"pipeline/restored_pending": float(len(saved["schedule"]["pending"])),  # logged at `start`
                    "pipeline/redo_samples": float(sum(len(idx) for _, idx in saved["redo"]))}
    delay = cfg.run.delay_s if r.world.rank == cfg.run.delay_rank else 0.0
    for step in range(start, cfg.run.steps):
        if r.stop.requested(group):
            break
        t0, r.work = time.perf_counter(), StepWork()
        r.trace.at(step)
        with r.timers("wait"):  # idle: the schedule waits for trajectories
            chosen = next_batch(pipe, rx) if main else None
        with r.timers("transfer"):
            batch = scatter_batch(chosen, plan, r.tok.pad_id or 0, group)
        with r.timers("trainer"):
            stats = train(r, batch, lr_at(step, cfg.run.steps, cfg.train.lr, cfg.train.lr_schedule,
                                          cfg.train.warmup_steps, cfg.train.min_lr_frac))
            if delay:  # a slow trainer (tests/spine/test_async.py)
                time.sleep(delay)
        sync_point(r, group)
        with r.timers("publish"):
            publish_version(r.trainer.full_weights(cfg.train.publish_bucket_mb), step + 1, plan.main_trainer,
                            plan.weight_group, send=main)
        work = reduce_work(r, time.perf_counter() - t0, stats, group)[0]  # the trainer ranks' part
        r.trace.span("step", t0, time.perf_counter(), step)
        stats.update(gpu_telemetry(r, group))
        if main:
            stats.update(pipe.metrics(chosen))
            stats.update(restored if step == start and r.resumed_from else {})
            pipe.advance()
            n = float(len(chosen))
            stats.update({"reward/mean": sum(t.reward for t in chosen) / n, "rollout/trained_seqs": n,
                          "rollout/trained_response_tokens": sum(t.length for t in chosen) / n})
        row = {**stats, **r.timers.pop(), "time/step": time.perf_counter() - t0, "policy_version": step + 1}
        row.update({f"_work/{i}": x for i, x in enumerate(work.vector())})  # merged with the rollout's (async_steps)
        row["perf/trained_samples_per_s"] = row.get("rollout/trained_seqs", 0.0) / max(row["time/step"], 1e-9)
        r.log.log(step, row)
        if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
            checkpoint_async(r, pipe, rx, step + 1, main, group)
        kill_switch(r, step)
    publish_version([], STOP, plan.main_trainer, plan.weight_group, send=main)
    if main:
        unused = float(rx.join())  # trajectories that arrived after the last step's choice
        if r.log.rows and "step" in r.log.rows[-1]:
            r.log.rows[-1]["pipeline/unused_at_end"] = unused
    return sum("policy_version" in row for row in r.log.rows)


def checkpoint_async(r: Run, pipe: PipelineState | None, rx: TrajectoryReceiver | None, step: int, main: bool,
                     group) -> None:
    """A training checkpoint with the pipeline's trainer side (what arrived so far, the schedule's
    state, the rows) and the work a resume must redo (``PipelineState.missing``): the trajectories
    still running or on their way are not held, they are generated again from their prompts by
    the resumed run's weights, so the staleness bound holds (docs/async.md, "Checkpoints")."""
    saved = None
    if main:
        for t in rx.drain():
            pipe.add(t)
        redo, first = pipe.missing()
        saved = {"schedule": pipe.state_dict(), "rows": [dict(row) for row in r.log.rows if "policy_version" in row],
                 "redo": redo, "first": first}
    save_training_state(r.trainer, r.run_dir, step, r.cfg.run.keep_checkpoints, r.world.rank, main, group,
                        pipeline=saved, hf=checkpoint_hf_files(r))


def checkpoint_hf_files(r: Run) -> dict:
    """What makes a training checkpoint exportable as an HF checkpoint (tools/export_checkpoint.py)."""
    model = r.trainer.model
    return hf_files(model.args, next(model.parameters()).dtype, r.tok.path)


def next_batch(pipe: PipelineState, rx: TrajectoryReceiver, patience_s: float = 600.0) -> list:
    """What arrived, then wait for more until the schedule can fill the step."""
    for t in rx.drain():
        pipe.add(t)
    waited = 0.0
    while (chosen := pipe.select()) is None:
        t = rx.get(timeout=10.0)
        if t is None:
            waited += 10.0
            if waited >= patience_s:
                raise RuntimeError(f"async pipeline: no trajectory arrived for {patience_s:.0f} s at step {pipe.step} "
                                   f"({sum(len(m) for m in pipe.pending.values())} pending, policy {pipe.policy})")
            continue
        waited = 0.0
        pipe.add(t)
        for t in rx.drain():
            pipe.add(t)
    return chosen


def scatter_batch(chosen: list | None, plan: Plan, pad_id: int, group):
    """The main trainer rank's chosen trajectories over the trainer ranks: the j-th group (in group
    order) to trainer dp rank j % D, as the synchronous bridge sends group g to g % D."""
    D, main = len(plan.trainer_ranks), plan.main_trainer
    if plan.rank != main:
        return join_rows([recv_rows(main, group)])
    ids = sorted({t.group for t in chosen})
    slot = {g: j % D for j, g in enumerate(ids)}
    parts = [trajectories_to_batch([t for t in chosen if slot[t.group] == d], pad_id) for d in range(D)]
    works = [w for d in range(1, D) for w in send_rows(parts[d], plan.trainer_ranks[d], group)]
    for w in works:
        w.wait()
    return parts[0]


def serve_reference(r: Run) -> None:
    """A reference rank's step: log-probs for the trainer ranks t with t % K == k, in order."""
    plan, K = r.plan, len(r.plan.reference_ranks)
    k = plan.reference_ranks.index(r.world.rank)
    trainers = [rank for t, rank in enumerate(plan.trainer_ranks) if t % K == k]
    args, peak = r.reference.model.args, r.peaks.flops

    def logprobs(td):  # the reference's own work: "reference"; the rest of the serve, waiting: "idle"
        with r.timers("reference"):
            r.work.add("reference", roofline=forward_cost(args, td[SEQ_LEN].tolist()).flops / peak)
            return r.reference.logprobs(td)

    t0, ref0 = time.perf_counter(), r.timers.times.get("reference", 0.0)
    serve_ref_logprobs(logprobs, trainers, plan.ref_group)
    r.timers.add("idle", time.perf_counter() - t0 - (r.timers.times.get("reference", 0.0) - ref0))


def sync_reference(r: Run) -> None:
    """Reference ranks of their own take the trainer's weights (after the warm-start: the KL anchor
    is the policy RL starts from), broadcast from the main trainer rank over the reference group."""
    plan, bucket_mb = r.plan, r.cfg.train.publish_bucket_mb
    if not plan.own_reference:
        return
    if plan.trainer_enabled:
        broadcast_weights(r.trainer.full_weights(bucket_mb), plan.main_trainer, plan.ref_group,
                          send=r.world.rank == plan.main_trainer)
    elif plan.reference_enabled:
        r.reference.load(receive_weights(r.reference.model, bucket_mb, plan.main_trainer, plan.ref_group))


def to_trainer(batch, plan: Plan):
    """Colocated: this rank trains what it generated. Disaggregated: finished groups cross the
    bridge group; trainer dp rank t receives the groups g with g % D == t."""
    if not plan.disaggregated:
        return batch
    if plan.rollout_enabled:
        send_groups(batch, plan.trainer_ranks, plan.bridge)
        return None
    return recv_groups(plan.rollout_ranks, plan.bridge) if plan.trainer_enabled else None


def train(r: Run, batch, lr: float) -> dict[str, float]:
    """Advantages, recompute, mismatch diagnostics, correction and the update, on a trainer rank."""
    cfg, a, trainer = r.cfg, r.cfg.algo, r.trainer
    trainer.set_lr(lr)
    if batch is None or batch.batch_size[0] == 0:
        raise ConfigError("a trainer rank received no trajectory group: rollout.prompts_per_step must be >= "
                          "the trainer ranks (checked at start-up)")
    batch = compute_advantages(batch, a.advantage, norm_std=a.norm_std)  # rewards only
    response = batch[LOSS_MASK]  # [B, T] the generated tokens, before any filter (utilisation)
    stats = {}
    if a.dynamic_sampling:  # DAPO: groups with equal rewards lose their loss tokens (and leave the normalisers)
        batch, dapo = dynamic_sampling(batch)
        stats.update(zip(dapo, all_reduce_sum([float(v) for v in dapo.values()], trainer.device, trainer.group)))
    keep = signal_rows(batch, LOSS_MASK)  # [B] False: a group with equal rewards (zero advantage)
    stats["rollout/zero_adv_seqs"] = all_reduce_sum([float((~keep).sum())], trainer.device, trainer.group)[0]
    # The lean step: zero-advantage trajectories are not trained and, when the correction only
    # reweights (their TRAIN_MASK is their LOSS_MASK), not recomputed either (train.skip_zero_adv)
    lean = cfg.train.skip_zero_adv and a.kl_coef == 0 and a.entropy_coef == 0
    only_signal = lean and a.correction in REWEIGHT_ONLY
    # One update per batch: pi_old is the training forward's own log-probs (no recompute forward)
    one_update = cfg.train.mini_batches == cfg.train.epochs == 1
    fused = cfg.train.fuse_old_logprobs and one_update and (only_signal or not lean)
    t0, n0 = time.perf_counter(), trainer.tokens_run
    with r.timers("recompute"):
        if not fused or trainer.reference is not None:  # pi_old, or only pi_ref for the fused step
            batch = trainer.recompute(batch, rows=keep if only_signal else None, policy=not fused)
        if r.plan.own_reference:  # pi_ref from the reference ranks
            t, K = r.plan.trainer_dp[0], len(r.plan.reference_ranks)
            batch[REF_LOGPROBS] = request_ref_logprobs(batch, r.plan.reference_ranks[t % K], r.plan.ref_group,
                                                       compute_dtype(next(trainer.model.parameters()).dtype))
    kw = dict(agg=a.agg, loss=a.loss, loss_kwargs=_loss_kwargs(cfg), kl_coef=a.kl_coef, entropy_coef=a.entropy_coef,
              norm_len=cfg.rollout.max_new_tokens, keep=keep if lean else None)
    correct = lambda b: apply_correction(b, a.correction, a.correction_form)  # noqa: E731
    t1, n1 = time.perf_counter(), trainer.tokens_run
    with r.timers("train"):
        if fused:
            s, batch, corr = trainer.fused_step(batch, correct, **kw)
        else:
            batch, corr = correct(batch)
            s = trainer.rl_step(batch, **kw, mini_batches=cfg.train.mini_batches, epochs=cfg.train.epochs)
    stats.update(s)
    u = usefulness(response, weighted_mask(corr.mask, batch[ADVANTAGES], corr.weight,
                                           regularised=a.kl_coef != 0 or a.entropy_coef != 0))  # [B]
    stats.update(trainer_utilisation(r, batch, keep if lean else None, keep if only_signal else None, fused,
                                     cfg.train.epochs, (t1 - t0, time.perf_counter() - t1), u,
                                     (n1 - n0, trainer.tokens_run - n1)))
    stats.update(mismatch_stats(batch, corr, keep if only_signal else slice(None), trainer))  # over pi_old's rows
    stats["train/lr"] = lr
    return stats


def trainer_utilisation(r: Run, batch, trained, recomputed, fused: bool, epochs: int,
                        seconds: tuple[float, float], u: torch.Tensor, executed: tuple[int, int]) -> dict[str, float]:
    """The trainer's model FLOPs this step (``sidpt.flops``: real tokens, dense attention, none of
    the savings of packing or of the lean rows counted as work) and its MFU per phase: the FLOPs
    over (peak x the phase's time), summed over the trainer ranks. ``trained`` / ``recomputed``:
    the rows each phase ran on (None: all); the recompute also runs the KL reference's forward.
    Into the step's accounts (``r.work``): each phase's roofline and useful time, from ``u`` [N]
    (each row's usefulness) and ``executed`` (the tokens the recompute's and the update's
    forwards ran on)."""
    args, lens = r.trainer.model.args, batch[SEQ_LEN].tolist()
    resp = batch[LOSS_MASK].sum(-1).tolist()  # the tokens whose log-probs (logits) are computed
    idx = lambda sel: list(range(len(lens))) if sel is None else sel.nonzero().flatten().tolist()  # noqa: E731
    trained, recomputed = idx(trained), idx(recomputed)  # the row indices each phase ran on

    def rows(ix):  # each row's length, and the logits the phase computed
        return [lens[i] for i in ix], sum(resp[i] for i in ix)

    train_flops = epochs * train_cost(args, *rows(trained)).flops
    forwards = (0 if fused else 1) + (r.trainer.reference is not None)
    rec_flops = forwards * forward_cost(args, *rows(recomputed)).flops
    u_l = u.tolist()
    add_model_phase(r.work, "recompute", rec_flops, r.peaks.flops, lens, u_l, recomputed, executed[0], forwards)
    add_model_phase(r.work, "train", train_flops, r.peaks.flops, lens, u_l, trained, executed[1], epochs)
    add_trained(r.work, lens, u_l)
    sums = all_reduce_sum([train_flops, rec_flops, r.peaks.flops * seconds[1], r.peaks.flops * seconds[0]],
                          r.trainer.device, r.trainer.group)
    return {"perf/train_tflop": sums[0] / 1e12, "perf/recompute_tflop": sums[1] / 1e12,
            "perf/train_mfu": sums[0] / max(sums[2], 1e-9), "perf/recompute_mfu": sums[1] / max(sums[3], 1e-9)}


def mismatch_stats(batch, corr, seen, trainer: Trainer) -> dict[str, float]:
    """``mismatch_metrics`` (with the correction and the advantages: ESS, masked and truncated
    fractions, the low-probability gradient share) over the recomputed rows, then over the trainer
    ranks: ``*_max`` maxed, the rest weighted by each rank's loss tokens."""
    part = Correction(*(getattr(corr, f)[seen] for f in ("weight", "mask", "truncated", "anchor")))
    mm = mismatch_metrics(batch[ROLLOUT_LOGPROBS][seen], batch[OLD_LOGPROBS][seen], batch[LOSS_MASK][seen], part,
                          batch[ADVANTAGES][seen])
    n_tok = float(batch[LOSS_MASK][seen].sum())
    maxed = sorted(k for k in mm if k.endswith("_max"))
    meaned = sorted(k for k in mm if not k.endswith("_max"))
    sums = all_reduce_sum([n_tok] + [float(mm[k]) * n_tok for k in meaned], trainer.device, trainer.group)
    out = {k: v / max(sums[0], 1.0) for k, v in zip(meaned, sums[1:])}
    out.update(zip(maxed, all_reduce_max([float(mm[k]) for k in maxed], trainer.device, trainer.group)))
    out["mismatch/tokens"] = sums[0]
    return out


def publish(r: Run, version: int | None = None, measure: bool = False) -> dict[str, float]:
    """Trainer's full weights -> every engine, bucket by bucket: a local copy after the FSDP
    all-gather (colocated), or a broadcast from the main trainer rank over the weight group.
    ``measure`` (the RL steps' publish): the probe check and, with ``run.verify_publish``, the
    weight comparison, returned for the step's row."""
    plan, bucket_mb, out = r.plan, r.cfg.train.publish_bucket_mb, {}
    if not plan.disaggregated:
        r.engine.update_weights(r.trainer.full_weights(bucket_mb), version=version)
        if measure:
            out["publish/probe_max_abs"] = probe_check(r.trainer, r.engine, r.prompt_ids(r.task.heldout[0]))
    elif plan.trainer_enabled:
        broadcast_weights(r.trainer.full_weights(bucket_mb), plan.main_trainer, plan.weight_group,
                          send=r.world.rank == plan.main_trainer)
    elif plan.rollout_enabled:
        r.engine.update_weights(receive_weights(r.engine.model, bucket_mb, plan.main_trainer, plan.weight_group),
                                version=version)
    if measure and r.cfg.run.verify_publish:
        out["publish/weights_max_abs"] = published_weights_diff(r)
    return out


@torch.no_grad()
def published_weights_diff(r: Run) -> float:
    """max |engine weight - trainer full weight| over all parameters and rollout ranks (0: every
    engine holds the trainer's weights bitwise). Disaggregated: the trainer sends them once more."""
    plan = r.plan

    def worst(buckets) -> float:
        params = dict(r.engine.model.named_parameters())
        return max(float((params[n] - t).abs().max()) for bucket in buckets for n, t in bucket.items())

    if not plan.disaggregated:
        return all_reduce_max([worst(r.trainer.full_weights())], r.world.device, r.trainer.group)[0]
    if not (plan.trainer_enabled or plan.rollout_enabled):
        return 0.0
    if plan.trainer_enabled:
        broadcast_weights(r.trainer.full_weights(), plan.main_trainer, plan.weight_group,
                          send=r.world.rank == plan.main_trainer)
        local = 0.0
    else:
        local = worst(receive_weights(r.engine.model, 64.0, plan.main_trainer, plan.weight_group, in_place=False))
    return all_reduce_max([local], r.world.device, plan.bridge)[0]


def probe_check(trainer: Trainer, engine: Engine, probe: list[int], n: int = 2) -> float:
    """max |engine logprob - trainer logprob| over a greedy continuation of a fixed probe prompt
    (colocated: both models on this rank). Two tokens: one from the prefill, one from a decode
    step through the paged cache, so both engine paths are checked every step; 8 tokens cost
    about 0.1 s a step on the peer benchmark's 17M model (5% of its step)."""
    out = engine.generate([Request(("probe", engine.policy_version), probe,
                                   SamplingParams(temperature=0.0, max_new_tokens=n))])[0]
    with torch.no_grad():
        lp, _ = sequence_logprobs(trainer.model, torch.tensor([out.tokens], device=engine.device))
    gen = torch.tensor(out.generated)
    return float((lp[0].cpu()[gen] - torch.tensor(out.logprobs)[gen]).abs().max())


def step_row(r: Run, episodes: list, stats: dict[str, float], wall: float, work: dict | None = None) -> dict[str, float]:
    """The step's metrics row: the episodes' statistics over the rollout mesh (the environment's
    ``metrics`` as ``env/*``), the engine's model FLOPs and bytes and their utilisation of the
    peaks over the rollout time (``work``: the engine's stats before the step), the trainer's, the
    timers; merged on the main rank."""
    plan = r.plan
    row = {}
    if plan.rollout_enabled:
        n = float(len(episodes))
        sums = {**{f"env/{k}": v for k, v in r.task.metrics(episodes).items()},
                "reward/mean": (sum(e.reward for e in episodes), n),
                "rollout/response_tokens": (float(sum(sum(e.out.generated) for e in episodes)), n),
                "rollout/seq_len": (float(sum(len(e.out.tokens) for e in episodes)), n)}
        totals = {"rollout/episodes": n, "rollout/faults": float(sum("fault" in e.info for e in episodes))}
        if work is not None and "flops" in work:  # the native engine (the speculative one does not count)
            t = r.timers.times.get("rollout", 0.0)
            totals.update({"perf/gen_tflop": (r.engine.stats["flops"] - work["flops"]) / 1e12,
                           "perf/gen_gbyte": (r.engine.stats["bytes"] - work["bytes"]) / 1e9,
                           "_roofline_s": r.engine.stats["roofline_s"] - work["roofline_s"], "_rollout_s": t,
                           "_peak_tflop": r.peaks.flops * t / 1e12, "_peak_gbyte": r.peaks.bytes * t / 1e9})
        row = reduce_metrics(sums, r.world.device, plan.group_of(plan.rollout_mesh), totals=totals)
        if "_peak_tflop" in row:  # over the rollout time, summed over the rollout ranks
            row["perf/gen_mfu"] = row["perf/gen_tflop"] / max(row.pop("_peak_tflop"), 1e-12)
            row["perf/gen_mbu"] = row["perf/gen_gbyte"] / max(row.pop("_peak_gbyte"), 1e-12)
            # the share of the rollout time the model's work needed at the roofline (the rest:
            # overheads, the environment, scheduling, and compute and memory not overlapping)
            row["perf/gen_roofline_frac"] = row.pop("_roofline_s") / max(row.pop("_rollout_s"), 1e-12)
        row["perf/gen_tokens_per_s"] = row["rollout/response_tokens"] * row["rollout/episodes"] / max(wall, 1e-9)
        row["policy_version"] = r.engine.policy_version
        if "drafted" in r.engine.stats:  # speculative rollouts: draft tokens the exact policy accepted, so far
            st = r.engine.stats
            row["rollout/spec_accept_rate"] = st["accepted"] / max(st["drafted"], 1)
            row["rollout/spec_tokens_per_round"] = st["emitted"] / max(st["request_rounds"], 1)  # per request
    row.update(stats)
    row.update(r.timers.pop())
    row["time/step"] = wall
    if plan.disaggregated and (plan.rollout_enabled or plan.trainer_enabled):
        # the main rank rolls out; the trainer's figures come from the main trainer rank
        send = row if r.world.rank in (0, plan.main_trainer) else {}
        merged = {}
        for part in gather_to_main([send], r.world, plan.bridge):
            merged.update({k: v for k, v in part.items() if k not in merged})
        row = merged if r.world.is_main else row
    return row


def replay_sft_rows(r: Run) -> None:
    """Disaggregated: the warm-start ran on the trainer ranks; the main trainer rank's rows (kept
    in memory by its MetricsLog) go to the main rank's metrics.jsonl over the bridge group."""
    if not r.plan.disaggregated or not (r.plan.rollout_enabled or r.plan.trainer_enabled):
        return
    rows = [row for row in r.log.rows if "sft_step" in row] if r.world.rank == r.plan.main_trainer else []
    for row in gather_to_main(rows, r.world, r.plan.bridge):
        r.log.log(int(row.pop("sft_step")), row, step_key="sft_step")


def evaluate_heldout(r: Run, name: str, step: int) -> dict[str, float]:
    """Greedy episodes on the held-out samples (rollout ranks), logged as eval/* at ``step``."""
    ev = {}
    if r.plan.rollout_enabled:
        ev = evaluate(r.engine, r.task, r.task.heldout[: r.cfg.task.eval_questions], r.prompt_ids, r.tok,
                      r.cfg.rollout.max_new_tokens, r.world, r.plan.rollout_dp, r.plan.group_of(r.plan.rollout_mesh),
                      r.run_dir / f"examples_{name}.jsonl", r.reward_fn, r.guard)
    r.log.log(step, {f"eval/{k}": v for k, v in ev.items()})
    return ev


def finish(r: Run, results: dict, curve: list, args, done: int) -> None:
    """Save the policy (HF checkpoint), results.json, the table and the reward curve; ``done``: the
    RL steps the policy has had (a resumed run's earlier ones included)."""
    policy_dir = r.run_dir / "policy"
    if r.trainer:
        save_policy(r.trainer.full_weights(r.cfg.train.publish_bucket_mb), r.tok, args, policy_dir,
                    write=r.world.rank == r.plan.main_trainer)
    if r.world.is_main:
        summary(r.console, results, r.task.eval_columns, r.run_dir, curve)
        util = run_utilisation(r)
        if util:
            r.console.print(utilisation_table(util))
        write_results(r.run_dir / "results.json", results, done, r.cfg, r.stop.signal, policy_dir,
                      device={"flops_per_s": r.peaks.flops, "bytes_per_s": r.peaks.bytes, "source": r.peaks.source},
                      utilisation=util)
        if r.stop.signal:
            r.console.print(f"[yellow]stopped by {r.stop.signal} after {done} of {r.cfg.run.steps} RL steps[/]; "
                            f"final evaluation, policy and results saved")
        r.console.print(f"policy: {policy_dir} (HF checkpoint: --model.path={policy_dir} reloads it), "
                        f"results: {r.run_dir / 'results.json'}")
    if r.gpu is not None:
        r.gpu.close()
    if r.trace.steps:  # every rank's spans to the main rank: one timeline
        events = gather_to_main(r.trace.events, r.world, world_group())
        if r.world.is_main:
            n = write_trace(r.run_dir / "trace.json", events, rank_names(r.plan, r.world.world_size))
            r.console.print(f"trace: {r.run_dir / 'trace.json'} ({n} spans of steps {r.cfg.run.trace_steps}; "
                            f"open it in ui.perfetto.dev)")
    r.log.close()
    shutdown()


def rank_role(plan: Plan, rank: int) -> str:
    """A rank's role in the waterfall by role (``utilisation.ROLES``)."""
    if rank in plan.rollout_ranks and rank in plan.trainer_ranks:
        return "colocated"
    if plan.own_reference and rank in plan.reference_ranks:
        return "reference"
    return "rollout" if rank in plan.rollout_ranks else "trainer"


def rank_names(plan: Plan, world_size: int) -> dict[int, str]:
    """Each rank's label in the timeline: its rank and role (``rank_role``)."""
    label = {"colocated": "rollout+trainer"}
    return {k: f"rank {k} ({label.get(rank_role(plan, k), rank_role(plan, k))})" for k in range(world_size)}


def build_roles(cfg: Config, plan: Plan, policy: Transformer, tok) -> tuple[Trainer | None, Engine | None,
                                                                         Reference | None]:
    """The trainer (FSDP2 over the trainer mesh) on trainer ranks, the engine (over its own copy of
    the model, filled by ``publish``) on rollout ranks, the frozen reference on its own ranks."""
    trainer = engine = reference = None
    if cfg.model.numerics == "exact":  # before the Trainer copies a reference or FSDP wraps it
        policy.set_numerics("exact")
        check_invariance(policy)
    if plan.own_reference and plan.reference_enabled:
        reference = Reference(policy, cfg.train.micro_batch_tokens)
    if plan.trainer_enabled:
        t = cfg.train
        fused = t.fused_logprobs == "on" or (t.fused_logprobs == "auto" and cfg.model.numerics != "exact"
                                             and next(policy.parameters()).device.type == "cuda")
        trainer = Trainer(policy, OptimConfig(t.lr, t.weight_decay, (t.beta1, t.beta2), t.grad_clip,
                                              t.micro_batch_tokens, t.pack, fused), mesh=plan.trainer_mesh,
                          reference=cfg.algo.kl_coef > 0 and not plan.own_reference)
    if plan.rollout_enabled:
        with torch.device("meta"):
            model = Transformer(policy.args)
        model = model.to_empty(device=next(policy.parameters()).device).to(next(policy.parameters()).dtype)
        model.set_numerics(cfg.model.numerics)
        c = cfg.rollout
        if c.speculative:
            return trainer, SpeculativeEngine(model, c.speculative, c.draft_precision, c.max_model_len), reference
        engine = Engine(model, EngineConfig(block_size=c.block_size, kv_cache_mb=c.kv_cache_mb,
                                            max_model_len=c.max_model_len, precision=c.precision, matmul=c.matmul,
                                            max_seqs=max(64, c.prompts_per_step * c.group_size)), tokenizer=tok)
    return trainer, engine, reference


def check_degrees(cfg: Config, plan: Plan) -> None:
    """The step's prompt groups must split over the rollout ranks, and every trainer rank must get one."""
    n_roll, n_train = len(plan.rollout_ranks), len(plan.trainer_ranks)
    if cfg.rollout.prompts_per_step % n_roll:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must divide by the "
                          f"{n_roll} rollout ranks")
    if cfg.rollout.prompts_per_step < n_train:
        raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step}: each of the {n_train} "
                          f"trainer ranks trains whole groups, so it needs >= {n_train}")
    if plan.own_reference and cfg.algo.kl_coef == 0:
        raise ConfigError(f"run.reference_ranks={len(plan.reference_ranks)}: the reference serves the KL term, "
                          f"and algo.kl_coef = 0 (those ranks would idle)")


def check_speculative(cfg: Config, task) -> None:
    """Speculative rollouts serve single-turn episodes: refuse a tool-calling environment at start-up."""
    stops = tuple(getattr(task.env, "stop_strings", ()))
    if cfg.rollout.speculative and stops:
        raise ConfigError(f"rollout.speculative={cfg.rollout.speculative}: speculative rollouts serve single-turn "
                          f"episodes, and env {cfg.env['name']!r} calls tools (stop strings {stops})")


def _loss_kwargs(cfg: Config) -> dict:
    if cfg.algo.loss in ("ppo", "gspo", "gspo_token", "cispo"):
        return {"eps_low": cfg.algo.eps_low, "eps_high": cfg.algo.eps_high}
    return {}


class _progress:
    """A rich progress bar on the main rank: ``with _progress(console, title, total) as bar: bar(info=...)``."""

    def __init__(self, console: Console, title: str, total: int):
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.task = self.p.add_task(title, total=total, info="")

    def __enter__(self):
        self.p.__enter__()
        return lambda info="": self.p.update(self.task, advance=1, info=info)

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)
