"""Training checkpoints and exact resume (sidpt.checkpoint, run.checkpoint_every, run.resume).

A fixed-seed run checkpointed every 2 RL steps is resumed after its newest checkpoint was
truncated: the truncated one is reported by name and skipped, the run resumes from the one
before, and its per-step losses, gradient norms and final weights are bitwise those of the
uninterrupted run (float32, this CPU: the same machine runs both)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidpt.checkpoint import MANIFEST, newest_checkpoint, verify
from sidpt.config import ConfigError, load_config, save_config
from sidpt.startup import check_same_config
from tests.spine.test_disaggregated import _free_port

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ["--sft.steps=20", "--rollout.prompts_per_step=8", "--train.lr=1e-3", "--run.checkpoint_every=2"]


def run(out: Path, name: str, extra: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                                  str(nproc), "--master-port", str(_free_port())]
    cmd = [*launch, "-m", "sidpt", str(ROOT / "configs/debug.toml"), *RECIPE, f"--run.out_dir={out}",
           f"--env.dir={out / 'task'}", f"--run.name={name}", "--run.threads=1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rl_rows(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines()) if "loss/total" in r}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run_dir / "policy").glob("*.safetensors")))


@pytest.mark.parametrize("placement", [[], pytest.param(["--run.placement=disaggregated", "--run.rollout_ranks=1"],
                                                        marks=pytest.mark.slow)])
def test_resume_is_bitwise_and_skips_a_truncated_checkpoint(tmp_path, placement):
    nproc = 2 if placement else 1
    run(tmp_path, "full", ["--run.steps=6", *placement], nproc)
    run(tmp_path, "part", ["--run.steps=4", *placement], nproc)  # "killed" after step 4: checkpoints 2 and 4
    ckpts = sorted((tmp_path / "part" / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000002", "step_000004"]
    shard = next(ckpts[1].glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7])  # truncated
    proc = run(tmp_path, "part", ["--run.steps=6", "--run.resume=auto", *placement], nproc)
    assert f"checkpoint {ckpts[1]} skipped: {shard.name} has" in proc.stdout.replace("\n", " ")
    assert f"resumed from {ckpts[0]}: 2 RL steps done" in proc.stdout.replace("\n", " ")
    full, resumed = rl_rows(tmp_path / "full" / "metrics.jsonl"), rl_rows(tmp_path / "part" / "metrics.jsonl")
    assert sorted(resumed) == [2, 3, 4, 5]
    assert sum(resumed[s]["train/grad_norm"] > 0 for s in resumed) >= 1  # a step that trained: not a vacuous match
    for step in resumed:
        for key in ("loss/total", "train/grad_norm", "reward/mean"):
            assert resumed[step][key] == full[step][key], (step, key)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "part" / "results.json").read_text())["rl_steps"] == 6
    # the newest checkpoint exports as an HF checkpoint: the policy the run saved, tokenizer included
    proc = subprocess.run([sys.executable, str(ROOT / "tools/export_checkpoint.py"), str(tmp_path / "part")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "part" / "hf_step_000006"
    assert f"-> {out}" in proc.stdout and (out / "tokenizer.json").exists() and (out / "config.json").exists()
    c = load_file(next(out.glob("*.safetensors")))
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)


ASYNC = ["--run.placement=disaggregated", "--run.rollout_ranks=1", "--run.pipeline=async"]


@pytest.mark.slow
def test_async_resume_with_staleness_zero_is_bitwise(tmp_path):
    """max_staleness = 0: the pipeline checkpoint (the schedule, the trajectories that arrived,
    the work to redo) resumes to the uninterrupted run's losses and weights, bitwise: the samples
    it lacked are generated again by the same version with the same seeds."""
    k0 = [*ASYNC, "--rollout.max_staleness=0"]
    run(tmp_path, "full", ["--run.steps=6", *k0], 2)
    run(tmp_path, "part", ["--run.steps=3", *k0], 2)  # stopped after step 3: the checkpoint of step 2
    ckpt = tmp_path / "part" / "checkpoints" / "step_000002"
    saved = torch.load(ckpt / "pipeline.pt", weights_only=True)
    assert saved["schedule"]["step"] == 2 and saved["first"] >= 2 * 8  # steps 0, 1 trained: 8 groups each
    proc = run(tmp_path, "part", ["--run.steps=6", "--run.resume=auto", *k0], 2)
    assert f"resumed from {ckpt}: 2 RL steps done" in proc.stdout.replace("\n", " ")
    full, resumed = rl_rows(tmp_path / "full" / "metrics.jsonl"), rl_rows(tmp_path / "part" / "metrics.jsonl")
    assert sorted(resumed) == sorted(full) == list(range(6))  # steps 0..3: the trainer's rows, from the checkpoint
    assert sum(resumed[s]["train/grad_norm"] > 0 for s in range(2, 6)) >= 1  # a resumed step that trained
    for step in resumed:
        for key in ("loss/total", "train/grad_norm", "reward/mean", "rollout/trained_seqs"):
            assert resumed[step][key] == full[step][key], (step, key)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_async_sigkill_with_staleness_two_resumes_within_the_bound(tmp_path):
    """max_staleness = 2 (debiased, the echo task, 2 rollout ranks + 1 trainer): the trainer rank
    is SIGKILLed after step 7 on the job's first attempt; torchrun (--max-restarts 1) restarts the
    job, which resumes from the step-6 checkpoint with the trajectories that had arrived and runs
    again the samples that were in flight, by the resumed version. Not bitwise (at k > 0 which
    version samples a token is a matter of timing, run to run), but the bound holds at every step,
    nothing is dropped, every step trains its 16 samples, and the pipeline state was used."""
    from tests.spine.test_async import ECHO, staleness_checks

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--max-restarts", "1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "sidpt",
           str(ROOT / "configs/echo.toml"), *ECHO, "--run.placement=disaggregated", "--run.pipeline=async",
           "--run.rollout_ranks=2", "--rollout.max_staleness=2", "--train.schedule=debiased", f"--run.out_dir={tmp_path}",
           "--run.name=killed", "--run.threads=1", "--run.checkpoint_every=3", "--run.keep_checkpoints=4",
           "--run.resume=auto", "--run.kill_rank=2", "--run.kill_step=7"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr  # the trainer did die of SIGKILL
    ckpt = tmp_path / "killed" / "checkpoints" / "step_000006"
    assert f"resumed from {ckpt}: 6 RL steps done" in proc.stdout.replace("\n", " ")
    rows = rl_rows(tmp_path / "killed" / "metrics.jsonl")
    assert sorted(rows) == list(range(12))  # 0..5 from the checkpoint, 6..11 trained after the restart
    rl = [rows[s] for s in range(12)]
    staleness_checks(rl, 2)
    assert all(row["sched/dropped"] == 0 and row["rollout/trained_seqs"] == 16 for row in rl)
    saved = torch.load(ckpt / "pipeline.pt", weights_only=True)
    restored, redo = rows[6]["pipeline/restored_pending"], rows[6]["pipeline/redo_samples"]
    assert restored == len(saved["schedule"]["pending"]) and redo == sum(len(i) for _, i in saved["redo"])
    assert restored + redo > 0  # the pipeline had run ahead: its state was used
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["rl_steps"] == 12


def test_verify_names_what_is_wrong(tmp_path):
    ck = tmp_path / "checkpoints" / "step_000003"
    ck.mkdir(parents=True)
    (ck / "a.bin").write_bytes(b"12345678")
    assert verify(ck) == "no manifest.json (the write did not finish)"
    import hashlib
    (ck / MANIFEST).write_text(json.dumps({"a.bin": {"sha256": hashlib.sha256(b"12345678").hexdigest(), "bytes": 8}}))
    assert verify(ck) is None
    (ck / "a.bin").write_bytes(b"12345679")
    assert verify(ck) == "a.bin does not match its checksum"
    (ck / "a.bin").unlink()
    assert verify(ck) == "a.bin is missing"
    older = tmp_path / "checkpoints" / "step_000001"
    older.mkdir()
    (older / MANIFEST).write_text("{}")
    said = []
    assert newest_checkpoint(tmp_path, said.append) == older
    assert said == [f"checkpoint {ck} skipped: a.bin is missing"]


def test_resume_refuses_another_config_naming_the_keys(tmp_path):
    saved = tmp_path / "config.toml"
    save_config(load_config(ROOT / "configs/debug.toml"), saved)
    check_same_config(load_config(ROOT / "configs/debug.toml", ["--run.steps=9", "--run.resume=auto"]), saved)
    with pytest.raises(ConfigError, match=r"another config \(train.lr: 1e-05 -> 0.001\)"):
        check_same_config(load_config(ROOT / "configs/debug.toml", ["--train.lr=1e-3"]), saved)


@pytest.mark.slow
def test_sigkill_of_a_rank_under_elastic_restart(tmp_path):
    """2 colocated gloo ranks; rank 1 is SIGKILLed after step 3 on the job's first attempt;
    torchrun (--max-restarts 1) restarts both ranks, which resume from the step-2 checkpoint: the
    job completes and its final weights equal the uninterrupted run's."""
    run(tmp_path, "full", ["--run.steps=6"], nproc=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    # the c10d rendezvous: a restart is a new round (the static one hands the restarted ranks the
    # first attempt's gloo addresses: "connectFullMesh failed ... Connection refused")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "sidpt", str(ROOT / "configs/debug.toml"), *RECIPE,
           f"--run.out_dir={tmp_path}", f"--env.dir={tmp_path / 'task'}", "--run.name=killed", "--run.threads=1",
           "--run.steps=6", "--run.resume=auto", "--run.kill_rank=1", "--run.kill_step=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr  # rank 1 did die of SIGKILL
    assert "resumed from" in proc.stdout.replace("\n", " ")  # and the restarted ranks resumed
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip_holds_the_kl_reference(tmp_path):
    """In one process: policy, AdamW state and the frozen KL reference (warm-started, not the init)
    come back bitwise into a fresh trainer."""
    from tensordict import TensorDict

    from sidpt.batch import LOSS_MASK, SEQ_LEN, TOKENS
    from sidpt.checkpoint import load_training_state, save_training_state
    from sidpt.model import ModelArgs, build_model
    from sidpt.trainer import OptimConfig, Trainer

    def trainer():
        return Trainer(build_model(ModelArgs(vocab_size=47), seed=2), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1.0, 4096),
                       reference=True)

    tokens = torch.randint(0, 47, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 5:] = True
    batch = TensorDict({TOKENS: tokens, SEQ_LEN: torch.full((4,), 12), LOSS_MASK: mask}, batch_size=[4])
    a = trainer()
    a.sft_step(batch)
    a.reset_reference()
    a.sft_step(batch)  # policy, reference and init now all differ
    path = save_training_state(a, tmp_path, 3, keep=1, rank=0, main=True, group=None)
    b = trainer()
    assert load_training_state(b, path, rank=0, group=None) == 3
    for m in ("model", "reference"):
        for (n, p), (_, q) in zip(getattr(a, m).named_parameters(), getattr(b, m).named_parameters()):
            assert torch.equal(p, q), (m, n)
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert not torch.equal(next(a.reference.parameters()), next(trainer().reference.parameters()))


def _tiny_trainer(seed=2):
    from sidpt.model import ModelArgs, build_model
    from sidpt.trainer import OptimConfig, Trainer

    return Trainer(build_model(ModelArgs(vocab_size=47), seed=seed), OptimConfig(3e-2, 0.0, (0.9, 0.99), 1.0, 4096))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    """The OS refuses the write half-way (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC): no
    directory is left behind, the previous checkpoint still verifies, the next write succeeds."""
    import resource
    import signal

    from sidpt.checkpoint import checkpoint_dir, save_training_state

    t = _tiny_trainer()
    assert save_training_state(t, tmp_path, 2, keep=2, rank=0, main=True, group=None) == checkpoint_dir(tmp_path, 2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
    said = []
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))  # the model file is ~200 KiB
        assert save_training_state(t, tmp_path, 4, keep=2, rank=0, main=True, group=None, report=said.append) is None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert len(said) == 1 and "step_000004 not written" in said[0] and "MiB free there" in said[0]
    assert "step_000002" in said[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
    assert verify(checkpoint_dir(tmp_path, 2)) is None
    assert save_training_state(t, tmp_path, 6, keep=2, rank=0, main=True, group=None) is not None
    assert newest_checkpoint(tmp_path, print) == checkpoint_dir(tmp_path, 6)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    """DCP's metadata is a pickle: a crafted one (with a manifest that matches it) is refused by
    name before anything runs."""
    import hashlib
    import pickle

    from sidpt.checkpoint import CheckpointError, load_training_state, save_training_state

    path = save_training_state(_tiny_trainer(), tmp_path, 2, keep=1, rank=0, main=True, group=None)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((path / MANIFEST).read_text())
    data = (path / ".metadata").read_bytes()
    manifest[".metadata"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert verify(path) is None  # intact by its manifest: the loader itself must refuse
    with pytest.raises(CheckpointError, match=r"\.metadata: refused \(posix.system is not a type"):
        load_training_state(_tiny_trainer(), path, rank=0, group=None)
    assert not marker.exists()
