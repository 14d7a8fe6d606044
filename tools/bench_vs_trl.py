"""A peer benchmark: TRL's ``GRPOTrainer`` vs sidpt's RL step, same checkpoint, geometry and reward.

    pip install trl==1.16.0                              # TRL is not a sidpt dependency
    python tools/bench_vs_trl.py                         # 25M, 2 x 8 samples, 64 new tokens, 6 steps
    python tools/bench_vs_trl.py --rounds 2 --steps 5                 # each system twice, alternating
    python tools/bench_vs_trl.py --flat-shares 0.5 --steps 10 --order sidpt-first
    python tools/bench_vs_trl.py --size 1M --steps 1 --warmup 1 --new-tokens 8 --flat-shares 0.5  # smoke
    python tools/bench_vs_trl.py --sidpt-only            # without TRL

One checkpoint, built once in a temporary directory: a random Qwen2-family model of sidpt's
``SIZES[--size]`` geometry (``--layers`` overrides the depth) over a character-level tokenizer
(the printable ASCII characters, newline and ``<|endoftext|>``, which is EOS and pad) that
transformers' ``AutoTokenizer`` and sidpt's ``Tokenizer`` both load; before anything runs, both
must encode every prompt to the same ids and decode them back to the same text, and transformers'
logits must equal sidpt's on a prompt. Then, for each share of flat groups (``--flat-shares``),
both systems run in subprocesses of their own (``--order``: which first), one after the other:

- TRL: ``GRPOTrainer`` (a hidden ``--_trl-worker`` run of this file), fp32 on the CPU, no vLLM, no
  reference model (beta 0), no gradient checkpointing, one generation and one optimizer update
  per step (per_device_train_batch_size = prompts x group, num_generations = group,
  steps_per_generation = 1, num_iterations = 1, gradient_accumulation_steps = 1).
- sidpt: the real program, ``python -m sidpt <toml> --key=value ...`` with ``PYTHONPATH=tools``, the
  arith environment's prompts and ``task.reward = "bench_vs_trl:reward"``, no SFT, the defaults of
  everything else (GRPO, the PPO loss, the lean step ``train.skip_zero_adv``).

**Matched work.** Same weights (the same files), same geometry (``--prompts`` x ``--group``
samples per step, up to ``--new-tokens`` new tokens, temperature 1, top-p 1, no top-k, fp32,
``--threads`` torch threads), lr 1e-6 (the random model stays random, so both sample the same
distribution: completion lengths match in expectation, not token for token), one optimizer update
per step, and the same prompts in the same order: sidpt draws each step's prompts from its seed
(``sidpt.data.step_indices`` over the arith train problems); TRL gets exactly that sequence as
its dataset with ``shuffle_dataset=False``, two prompts per step. The reward, ``reward`` below
(one function, imported by both), scores the completion text: the share of its characters in
``SCORED`` plus a tie-breaker < 1e-3 from a hash of the text, so the 8 samples of a group
differ (every sample gets a nonzero advantage), except on the flat prompts, where it returns
``FLAT_REWARD`` (all advantages 0). The flat prompts are chosen here, spread evenly over the
measured groups so that a share ``s`` gives round(s x groups) flat groups exactly (0.9: the search
demo's share of equal-reward groups), and passed to both as ``BENCH_FLAT_IDS``. The table shows the
realised share per system: TRL's counted in its reward function, sidpt's from
``rollout/zero_adv_seqs`` in its metrics.jsonl. sidpt leaves the flat groups out of its
recompute and update (exact: their gradient is 0); TRL trains every row.

**Measured.** ``--steps`` steps after ``--warmup`` unmeasured ones. TRL: the wall time from a
``TrainerCallback``'s ``on_step_begin`` to its ``on_step_end`` (generation, scoring, the loss's
forward and backward, gradient clip, optimizer step); generation is the time inside the model's
``generate`` (wrapped), "score" the rest of ``_generate_and_score_completions`` (tokenizing,
padding, the reward, advantages), "train" the remainder. sidpt: its own timers
(``time/step``, ``time/rollout`` = generation with the reward calls and batch building,
``time/recompute`` (about 0 here: with one update per batch sidpt takes pi_old from the training
forward, ``train.fuse_old_logprobs``, as TRL does with num_iterations 1), ``time/train``,
``time/publish`` (the weight copy into the engine and its probe check); "rest" = step minus
those: advantages, the correction and mismatch statistics). s/step is the median over the
measured steps, samples/s is samples per step over it, the phases and completion tokens per step
are means; with ``--rounds`` each system runs that many times per workload, alternating, the
order flipping every round (the machine's speed drifts: neither system gets the fast minutes),
the table pools all measured steps and a line gives the ratio of each round. Every row goes to
``--out`` (JSONL, rewritten atomically after each workload).
Another process on the cores skews every number (torch on busy cores runs many times slower):
the load average is checked before each system runs.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

EOS = "<|endoftext|>"
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # the tokenizer's characters; EOS comes after them
SCORED = frozenset("etaoin ETAOIN0123456789")  # the reward: the share of a completion's characters in here
FLAT_REWARD = 0.5  # the reward of every sample of a flat prompt
SYSTEMS = ("trl", "sidpt")

_flat_ids: frozenset[str] | None = None
_seen: list[str] | None = None  # with BENCH_REWARD_LOG: every id scored, written there at exit


# ---------------------------------------------------------------------------------------------
# The reward (imported by sidpt as task.reward = "bench_vs_trl:reward", called by TRL's wrapper)


def is_flat(sample_id: str) -> bool:
    """A flat prompt: in ``BENCH_FLAT_IDS`` (a JSON list the benchmark sets); without it, a share
    ``BENCH_FLAT_SHARE`` (default 0) of the ids by a hash of the id."""
    global _flat_ids
    if _flat_ids is None and "BENCH_FLAT_IDS" in os.environ:
        _flat_ids = frozenset(json.loads(os.environ["BENCH_FLAT_IDS"]))
    if _flat_ids is not None:
        return sample_id in _flat_ids
    return _unit_hash(sample_id) < float(os.environ.get("BENCH_FLAT_SHARE", "0"))


def _unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from ``text`` (not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def reward(sample, response_text: str, info=None) -> float:
    """sidpt's custom-reward signature ``(sample, response_text, info) -> float``: ``FLAT_REWARD``
    on a flat prompt, else the share of the response's characters in ``SCORED`` plus a tie-breaker
    in [0, 1e-3) from a hash of the text (EOS text, which sidpt's response keeps and TRL's drops,
    is removed first, so both score the same completion the same)."""
    global _seen
    if _seen is None and os.environ.get("BENCH_REWARD_LOG"):
        _seen = []
        atexit.register(lambda: Path(os.environ["BENCH_REWARD_LOG"]).write_text(json.dumps(_seen)))
    if _seen is not None:
        _seen.append(sample.id)
    if is_flat(sample.id):
        return FLAT_REWARD
    text = response_text.replace(EOS, "")
    share = sum(c in SCORED for c in text) / max(len(text), 1)
    return share + 1e-3 * _unit_hash(text)


# ---------------------------------------------------------------------------------------------
# The checkpoint: a random Qwen2 model over a character-level tokenizer


# Qwen2Tokenizer's pre-tokenizer regex (transformers.models.qwen2.tokenization_qwen2)
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def byte_level_char(c: str) -> str:
    """The character that byte-level BPE (GPT-2, Qwen2) writes for the ASCII character ``c``: itself
    if printable, else the n-th character after U+00FF, n its rank among the bytes that are not."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    return c if ord(c) in keep else chr(256 + [b for b in range(256) if b not in keep].index(ord(c)))


def write_tokenizer(out: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` of a character-level tokenizer: one token
    per character of ``CHARS``, then EOS (special; also pad and unk).

    It is a byte-level BPE without merges, laid out as transformers' ``Qwen2Tokenizer`` builds
    itself: transformers 5 loads any ``model_type = "qwen2"`` checkpoint's tokenizer as
    Qwen2Tokenizer (whatever ``tokenizer_class`` says), which keeps only the vocabulary and merges
    of tokenizer.json and puts its own normaliser, pre-tokenizer and decoder around them. A
    WordLevel vocabulary over raw characters with a split-every-character pre-tokenizer reads
    correctly in sidpt but loses every space there (measured): so the file holds Qwen2's own
    pipeline, and with no merges every character is one token in both."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from sidpt.files import atomic_write

    vocab = {byte_level_char(c): i for i, c in enumerate(CHARS)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()  # the bytes back as they were, spaces included
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "tokenizer.json", tok.to_str())
    atomic_write(out / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "bos_token": None, "add_bos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096,
    }, indent=2) + "\n")


def build_checkpoint(path: Path, size: str, layers: int | None, seed: int = 0):
    """A random Qwen2-family model of ``SIZES[size]`` (vocab: the character tokenizer's), saved
    with its tokenizer at ``path``; returns its ModelArgs."""
    from sidpt.model import SIZES, build_model, save_checkpoint

    tok_dir = path.parent / "tokenizer"
    write_tokenizer(tok_dir)
    args = dataclasses.replace(SIZES[size], vocab_size=len(CHARS) + 1, family="qwen2", qkv_bias=True,
                               qk_norm=False, o_bias=False, eos_token_id=len(CHARS), bos_token_id=None,
                               **({"n_layers": layers} if layers else {}))
    save_checkpoint(path, build_model(args, seed=seed),
                    extra_files={n: tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json")})
    return args


def check_checkpoint(path: Path, prompts: list[str]) -> str:
    """Both loaders read the checkpoint alike: the same ids and text for every prompt, EOS and pad
    set, transformers' logits equal to sidpt's. Returns a line for the console."""
    import torch

    from sidpt.model import Tokenizer, load_checkpoint

    st = Tokenizer(path)
    assert st.eos_id == len(CHARS) and st.pad_id == st.eos_id, (st.eos_id, st.pad_id)
    model = load_checkpoint(path)
    for p in prompts:
        ids = st.encode(p)
        assert len(ids) == len(p) and st.decode(ids) == p, (p, ids)
    try:
        import transformers
    except ImportError:
        return "checkpoint: sidpt's loaders read it (transformers not installed: its check skipped)"
    from transformers.models.qwen2 import tokenization_qwen2

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    assert tokenization_qwen2.PRETOKENIZE_REGEX == QWEN2_SPLIT, "transformers' Qwen2 pre-tokenizer changed"
    ht = transformers.AutoTokenizer.from_pretrained(path)
    assert isinstance(ht, transformers.PreTrainedTokenizerFast), type(ht)
    assert (ht.eos_token, ht.pad_token, ht.eos_token_id, ht.pad_token_id) == (EOS, EOS, st.eos_id, st.eos_id)
    hf_ids = ht(text=prompts)["input_ids"]  # as TRL tokenizes them
    for p, h in zip(prompts, hf_ids):
        assert h == st.encode(p), (p, h, st.encode(p))
        assert ht.decode(h) == p == st.decode(h), (p, ht.decode(h))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor([st.encode(prompts[0])])
    with torch.no_grad():
        diff = float((hf(x).logits - model(x)).abs().max())
    assert diff < 1e-3, f"transformers' logits differ from sidpt's by {diff}"
    return (f"checkpoint: both tokenizers give the same ids and text on {len(prompts)} prompts; "
            f"logits max |HF - sidpt| = {diff:.1e}")


# ---------------------------------------------------------------------------------------------
# The prompts: sidpt's own draw, which TRL gets as its dataset


def arith_task(n_train: int, n_heldout: int):
    from sidpt.env.arith import Config, make_task

    return make_task(Config(n_train=n_train, n_heldout=n_heldout), True, False)


def prompt_plan(task, prompts: int, warmup: int, steps: int, share: float, seed: int = 0) -> dict:
    """The groups sidpt draws at each step (``step_indices``, as its controller does), and the
    flat ids: an even spread of round(share x groups) over the measured groups (and over the
    warm-up's, separately)."""
    from sidpt.data import step_indices

    seq = [task.train[i] for step in range(warmup + steps)
           for i in step_indices(len(task.train), prompts, seed, step)]

    def spread(groups: list) -> list[str]:  # group k is flat when round((k + 1) s) > round(k s)
        return [g.id for k, g in enumerate(groups)
                if math.floor((k + 1) * share + 0.5) > math.floor(k * share + 0.5)]

    cut = warmup * prompts
    flat = spread(seq[:cut]) + spread(seq[cut:])
    return {"ids": [q.id for q in seq], "texts": [task.prompt(q) for q in seq],
            "flat_ids": sorted(set(flat)), "measured_ids": [q.id for q in seq[cut:]]}


# ---------------------------------------------------------------------------------------------
# TRL: a worker process


def trl_worker(spec_path: str) -> None:
    """Run GRPOTrainer as ``spec`` says; write one JSON row per step to ``spec["rows"]``."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    import trl
    from trl import GRPOConfig, GRPOTrainer

    from sidpt.files import atomic_write

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    G = spec["group"]
    tok = transformers.AutoTokenizer.from_pretrained(spec["ckpt"])
    dataset = datasets.Dataset.from_dict({"prompt": spec["texts"], "pid": spec["ids"]})
    cur = {}  # the current step's counters

    def bench_reward(prompts, completions, completion_ids, pid, **kw):
        gids = pid[::G]  # the sampler yields each prompt num_generations times in a row (checked)
        assert all(pid[i] == pid[i - i % G] for i in range(len(pid))), pid
        cur["groups"] += len(gids)
        cur["flat_groups"] += sum(is_flat(i) for i in gids)
        cur["tokens"] += sum(len(c) for c in completion_ids)
        p_len = [len(tok(p).input_ids) for p in prompts]
        c_len = [len(c) for c in completion_ids]
        cur["seq_tokens"] += sum(p_len) + sum(c_len)  # real tokens of the trained rows
        cur["forward_tokens"] += len(c_len) * (max(p_len) + max(c_len))  # left-padded prompts, right-padded completions
        cur["ids"] += gids
        return [reward(SimpleNamespace(id=i), c, {}) for i, c in zip(pid, completions)]

    config = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, fp16=False,
        model_init_kwargs={"dtype": "float32"},
        # one generation and one optimizer update per step, no reference model, no vLLM
        per_device_train_batch_size=spec["prompts"] * G, num_generations=G, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, beta=0.0, use_vllm=False,
        max_completion_length=spec["new_tokens"], temperature=spec["temperature"], top_p=spec["top_p"],
        top_k=spec["top_k"],
        # sidpt's optimiser settings (AdamW, constant lr, clip 1; TRL defaults to checkpointing: off)
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, gradient_checkpointing=False,
        max_steps=spec["total_steps"], shuffle_dataset=False, seed=spec["seed"], dataloader_num_workers=0,
        report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False,
    )

    rows: list[dict] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            cur.update(groups=0, flat_groups=0, tokens=0, ids=[], gen_s=0.0, gen_calls=0, score_s=0.0, seq_tokens=0,
                       forward_tokens=0)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.t
            rows.append({"step": state.global_step - 1, "time_step": dt, "time_generate": cur["gen_s"],
                         "time_score": cur["score_s"] - cur["gen_s"], "time_train": dt - cur["score_s"],
                         "gen_calls": cur["gen_calls"], "tokens": cur["tokens"], "groups": cur["groups"],
                         "seq_tokens": cur["seq_tokens"], "forward_tokens": cur["forward_tokens"],
                         "flat_groups": cur["flat_groups"], "ids": cur["ids"],
                         "threads": torch.get_num_threads()})

    trainer = GRPOTrainer(model=spec["ckpt"], reward_funcs=bench_reward, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[StepTimer()])
    model, gen_and_score = trainer.model, trainer._generate_and_score_completions
    generate = model.generate

    def timed_generate(*args, **kw):  # the call GRPOTrainer makes on the unwrapped model
        t = time.perf_counter()
        try:
            return generate(*args, **kw)
        finally:
            cur["gen_s"] += time.perf_counter() - t
            cur["gen_calls"] += 1

    def timed_gen_and_score(*args, **kw):
        t = time.perf_counter()
        try:
            return gen_and_score(*args, **kw)
        finally:
            cur["score_s"] += time.perf_counter() - t

    model.generate = timed_generate
    trainer._generate_and_score_completions = timed_gen_and_score
    trainer.train()
    bad = [r["step"] for r in rows if r["gen_calls"] != 1]
    if bad:
        raise SystemExit(f"TRL worker: steps {bad} did not call the timed generate exactly once (the timer "
                         f"missed the generation path); the phase split would be wrong")
    meta = {"meta": True, "trl": trl.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__}
    atomic_write(spec["rows"], "".join(json.dumps(r) + "\n" for r in [meta, *rows]))


# ---------------------------------------------------------------------------------------------
# Running the two systems


def child_env(a, plan: dict, reward_log: Path | None = None) -> dict:
    """The environment of a system's process: this directory on PYTHONPATH (the reward), the
    flat ids, the thread count, offline, quiet."""
    tools = str(Path(__file__).resolve().parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = tools + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(BENCH_FLAT_IDS=json.dumps(plan["flat_ids"]), OMP_NUM_THREADS=str(a.threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    if reward_log is not None:
        env["BENCH_REWARD_LOG"] = str(reward_log)
    return env


def run_child(cmd: list[str], env: dict, log: Path, what: str) -> None:
    """Run one system's process from the repository root, its output in ``log``."""
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1]).returncode
    if rc:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise SystemExit(f"{what} failed (exit {rc}); the end of its log {log}:\n{tail}")


def run_trl(a, ckpt: Path, plan: dict, work: Path) -> dict:
    out = work / "trl"
    out.mkdir(parents=True, exist_ok=True)
    spec = {"ckpt": str(ckpt), "out_dir": str(out / "trainer"), "rows": str(out / "rows.jsonl"),
            "texts": plan["texts"], "ids": plan["ids"], "threads": a.threads, "group": a.group,
            "prompts": a.prompts, "new_tokens": a.new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "lr": a.lr, "total_steps": a.warmup + a.steps, "seed": 0}
    (out / "spec.json").write_text(json.dumps(spec))
    t = time.perf_counter()
    run_child([sys.executable, str(Path(__file__).resolve()), "--_trl-worker", str(out / "spec.json")],
              child_env(a, plan), out / "log.txt", "the TRL worker")
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()]
    meta, steps = rows[0], rows[1:]
    if len(steps) != a.warmup + a.steps:
        raise SystemExit(f"TRL ran {len(steps)} steps, expected {a.warmup + a.steps}; see {out / 'log.txt'}")
    ids = [i for r in steps for i in r["ids"]]
    measured = steps[a.warmup:]
    return {"meta": meta, "wall": wall, "same_prompts": ids == plan["ids"], "steps": [
        {"step": r["step"], "time_step": r["time_step"], "time_generate": r["time_generate"],
         "time_score": r["time_score"], "time_train": r["time_train"], "tokens": r["tokens"],
         "seq_tokens": r["seq_tokens"], "forward_tokens": r["forward_tokens"],
         "flat_groups": r["flat_groups"], "groups": r["groups"], "threads": r["threads"]} for r in measured]}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)  # numbers, and strings (JSON escapes are TOML basic-string escapes)


SIDPT_PHASES = ("time/rollout", "time/recompute", "time/train", "time/publish")


def run_sidpt(a, ckpt: Path, plan: dict, work: Path, task, n_train: int, n_heldout: int) -> dict:
    out = work / "sidpt"
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "run": {"name": "bench", "out_dir": str(out), "seed": 0, "threads": a.threads, "eval_every": 0},
        "model": {"path": str(ckpt), "dtype": "float32"},
        "env": {"name": "arith", "n_train": n_train, "n_heldout": n_heldout},
        "task": {"reward": "bench_vs_trl:reward", "eval_questions": 1},
        "sft": {"steps": 0},
        "train": {"lr": a.lr},
    }
    toml = out / "bench.toml"
    toml.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in t.items()) + "\n"
                            for s, t in cfg.items()))
    overrides = {"run.steps": a.warmup + a.steps, "rollout.prompts_per_step": a.prompts,
                 "rollout.group_size": a.group, "rollout.max_new_tokens": a.new_tokens,
                 "rollout.max_model_len": a.new_tokens + 128, "rollout.temperature": 1.0, "rollout.top_p": 1.0,
                 "rollout.top_k": 0}
    cmd = [sys.executable, "-m", "sidpt", str(toml), *(f"--{k}={toml_value(v)}" for k, v in overrides.items()),
           *(f"--{kv}" for kv in a.sidpt_set)]
    t = time.perf_counter()
    run_child(cmd, child_env(a, plan, out / "rewarded.json"), out / "log.txt", "sidpt: " + " ".join(cmd[1:]))
    wall = time.perf_counter() - t
    # the prompts sidpt scored (held-out evaluation left out) against the plan's, group_size each
    heldout = {q.id for q in task.heldout}
    seen = Counter(i for i in json.loads((out / "rewarded.json").read_text()) if i not in heldout)
    same = seen == Counter(i for i in plan["ids"] for _ in range(a.group))
    rows = [json.loads(line) for line in (out / "bench" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if "time/step" in r]
    if len(rl) != a.warmup + a.steps:
        raise SystemExit(f"sidpt logged {len(rl)} RL steps, expected {a.warmup + a.steps}; "
                         f"see {out / 'log.txt'}")
    missing = [k for k in ("time/step", "time/rollout", "rollout/zero_adv_seqs", "rollout/response_tokens",
                           "rollout/episodes") if k not in rl[0]]
    if missing:
        raise SystemExit(f"sidpt's metrics.jsonl rows lack {missing} (keys: {sorted(rl[0])})")
    steps = []
    for r in rl[a.warmup:]:
        phases = {k.removeprefix("time/"): r.get(k, 0.0) for k in SIDPT_PHASES}
        eps = r["rollout/episodes"]
        steps.append({"step": r["step"], "time_step": r["time/step"],
                      **{f"time_{k}": v for k, v in phases.items()},
                      "time_rest": r["time/step"] - sum(phases.values()),
                      "tokens": r["rollout/response_tokens"] * eps,
                      "seq_tokens": r.get("train/seq_tokens", 0.0), "forward_tokens": r.get("train/forward_tokens", 0.0),
                      "flat_groups": r["rollout/zero_adv_seqs"] / a.group, "groups": eps / a.group,
                      "timers": {k: v for k, v in r.items() if k.startswith("time/")}})
    return {"wall": wall, "same_prompts": same, "steps": steps}


# ---------------------------------------------------------------------------------------------
# The table


def pool(results: list[dict]) -> dict:
    """Several runs of one system as one: their measured steps together."""
    return {"wall": sum(r["wall"] for r in results), "same_prompts": all(r["same_prompts"] for r in results),
            "steps": [step for r in results for step in r["steps"]], "meta": results[0].get("meta")}


def summarise(system: str, res: dict, samples: int) -> dict:
    st = res["steps"]
    med = statistics.median(r["time_step"] for r in st)
    mean = lambda k: statistics.fmean(r[k] for r in st) if st and k in st[0] else None  # noqa: E731
    return {"system": system, "s_per_step": med, "s_per_step_mean": mean("time_step"),
            "samples_per_s": samples / med, "tokens_per_step": mean("tokens"),
            "tokens_per_s": mean("tokens") / med,
            "flat_share": sum(r["flat_groups"] for r in st) / max(sum(r["groups"] for r in st), 1),
            **{k: mean(k) for k in ("time_generate", "time_rollout", "time_score", "time_recompute",
                                    "time_train", "time_publish", "time_rest", "seq_tokens", "forward_tokens")},
            "same_prompts": res.get("same_prompts"), "wall_s": res["wall"], "measured_steps": len(st)}


CAPTION = ("generate s: TRL, inside model.generate; sidpt, time/rollout (generation, the reward calls, the "
           "batch). score s: the rest of TRL's _generate_and_score_completions. train s: forward, backward, clip, "
           "optimizer. rest s: sidpt's advantages, correction, statistics. s/step: median; phases: means.")
COLUMNS = ("system", "s/step", "samples/s", "tokens/step", "generate s", "score s", "recompute s", "train s",
           "publish s", "rest s", "flat groups", "samples/s vs TRL")


def table(console, title: str, sums: dict) -> None:
    from rich.table import Table

    t = Table(title=title, caption=CAPTION)
    for col in COLUMNS:
        t.add_column(col, justify="right")
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    base = sums.get("trl")
    for name in SYSTEMS:
        if (s := sums.get(name)) is None:
            continue
        gen = s["time_generate"] if name == "trl" else s["time_rollout"]
        ratio = f"{s['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        t.add_row(name, f"{s['s_per_step']:.3f}", f"{s['samples_per_s']:.1f}", f"{s['tokens_per_step']:.1f}",
                  f(gen), f(s["time_score"]), f(s["time_recompute"]), f(s["time_train"]), f(s["time_publish"]),
                  f(s["time_rest"]), f"{s['flat_share']:.0%}", ratio)
    console.print(t)


def utilisation_table(console, sums: dict, n_params: int, peak: float) -> None:
    """The trainer phase against the matmul peak measured in this run: model FLOPs 6 N per real
    token of every trained trajectory (prompt included; N = non-embedding parameters plus the LM
    head; attention FLOPs left out), executed FLOPs 6 N per token the forwards ran on (TRL: rows x
    (longest prompt + longest completion); sidpt: packed tokens, each group's prompt once). MFU
    above 100% means the trainer did the model's work with fewer FLOPs than a padded batch."""
    from rich.table import Table

    t = Table(title=f"trainer utilisation: 6 N FLOPs per token, N = {n_params / 1e6:.1f}M, peak {peak / 1e9:.0f} "
                    f"GFLOP/s (1024^3 GEMM, this run)")
    for col in ("system", "train s", "trajectory tokens", "executed tokens", "MFU", "HFU"):
        t.add_column(col, justify="right")
    for name in SYSTEMS:
        if (s := sums.get(name)) is None or not s.get("time_train"):
            continue
        flops = lambda tok: 6 * n_params * tok / s["time_train"] / peak  # noqa: E731
        t.add_row(name, f"{s['time_train']:.3f}", f"{s['seq_tokens']:.0f}", f"{s['forward_tokens']:.0f}",
                  f"{flops(s['seq_tokens']):.0%}", f"{flops(s['forward_tokens']):.0%}")
    console.print(t)


def check_load(console, what: str = "") -> float:
    """The 1-minute load average (/proc/loadavg), with a warning above 0.5: torch on cores that
    another process is using runs many times slower, and unevenly between the two systems."""
    try:
        load = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        load = os.getloadavg()[0]
    busy = load > 0.5
    if what or busy:
        console.print(("[yellow]" if busy else "") + (f"{what}: " if what else "") + f"load average {load:.2f}"
                      + ("; another process is busy: these timings will be slow and uneven[/]" if busy else ""))
    return load


def main() -> None:
    from sidpt.flops import measure_peaks  # the GEMM peak every run logs

    from sidpt.model import SIZES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="25M", choices=list(SIZES), help="sidpt's named model geometry")
    ap.add_argument("--layers", type=int, default=None, help="override the geometry's n_layers")
    ap.add_argument("--prompts", type=int, default=2, help="prompts (groups) per step")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per sample")
    ap.add_argument("--steps", type=int, default=6, help="measured steps")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each system")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--flat-shares", type=float, nargs="+", default=[0.0, 0.5, 0.9],
                    help="shares of flat (equal-reward) groups, one workload each")
    ap.add_argument("--order", choices=["trl-first", "sidpt-first"], default="trl-first")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each system per workload, alternating (the order flips every round)")
    ap.add_argument("--sidpt-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra sidpt config overrides, e.g. train.pack=false (an ablation)")
    ap.add_argument("--sidpt-only", action="store_true", help="run sidpt alone (no TRL needed)")
    ap.add_argument("--out", default="runs/bench_vs_trl.jsonl", help="every row, JSONL")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (checkpoint, logs)")
    ap.add_argument("--_trl-worker", dest="trl_worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        return trl_worker(a.trl_worker)

    from rich.console import Console

    from sidpt.files import atomic_write

    console = Console(width=None if sys.stdout.isatty() else 160)
    if not a.sidpt_only:
        try:
            import trl
        except ImportError:
            console.print("TRL is not installed: pip install trl==1.16.0 (or run --sidpt-only)")
            sys.exit(2)
        if trl.__version__ != "1.16.0":
            console.print(f"[yellow]trl {trl.__version__}: this benchmark was written against 1.16.0 "
                          f"(pip install trl==1.16.0)[/]")
    if not all(0.0 <= s <= 1.0 for s in a.flat_shares):
        raise SystemExit(f"--flat-shares {a.flat_shares}: each must be in [0, 1]")
    import torch

    torch.set_num_threads(a.threads)
    load = check_load(console)
    work = Path(tempfile.mkdtemp(prefix="bench_vs_trl."))
    n_train, n_heldout = 2000, 20
    try:
        ckpt = work / "ckpt"
        args = build_checkpoint(ckpt, a.size, a.layers)
        task = arith_task(n_train, n_heldout)
        console.print(f"model: qwen2 {args.num_params() / 1e6:.1f}M params ({a.size}, {args.n_layers} layers, "
                      f"dim {args.dim}, vocab {args.vocab_size}) at {ckpt}")
        console.print(check_checkpoint(ckpt, [task.prompt(q) for q in task.train[:64]]))
        systems = ["sidpt"] if a.sidpt_only else ["trl", "sidpt"][:: 1 if a.order == "trl-first" else -1]
        out_rows, samples, out = [], a.prompts * a.group, Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for share in a.flat_shares:
            plan = prompt_plan(task, a.prompts, a.warmup, a.steps, share)
            out_rows.append({"kind": "plan", "flat_share_target": share, **plan})
            runs: dict[str, list[dict]] = {name: [] for name in systems}
            for rnd in range(a.rounds):  # the order flips every round: a drifting machine favours neither
                for name in systems if rnd % 2 == 0 else systems[::-1]:
                    wl = work / f"flat{share:g}" / f"round{rnd}"
                    before = check_load(console, f"flat share {share:g}, {name}, round {rnd + 1}/{a.rounds}")
                    if name == "trl":
                        res = run_trl(a, ckpt, plan, wl)
                    else:
                        res = run_sidpt(a, ckpt, plan, wl, task, n_train, n_heldout)
                    if not res["same_prompts"]:
                        console.print(f"[yellow]{name} did not score the planned prompts (sidpt's draw or TRL's "
                                      f"dataset order changed?): the realised flat share below still holds[/]")
                    runs[name].append(res)
                    common = {"flat_share_target": share, "system": name, "size": a.size, "n_layers": args.n_layers,
                              "prompts": a.prompts, "group": a.group, "new_tokens": a.new_tokens,
                              "threads": a.threads, "load_before": before, "round": rnd}
                    out_rows += [{"kind": "step", **common, **r} for r in res["steps"]]
                    out_rows.append({"kind": "summary", **common, **summarise(name, res, samples),
                                     "versions": res.get("meta")})
            sums = {name: summarise(name, pool(rs), samples) for name, rs in runs.items()}
            table(console, f"{a.size} qwen2 ({args.n_layers} layers), {a.prompts} x {a.group} samples, "
                           f"<= {a.new_tokens} new tokens, fp32, {a.threads} threads; flat share {share:g}; "
                           f"median of {a.steps} steps after {a.warmup} warm-up x {a.rounds} round(s)", sums)
            if a.rounds > 1 and "trl" in runs:
                per = [summarise("sidpt", s, samples)["samples_per_s"] / summarise("trl", t, samples)["samples_per_s"]
                       for s, t in zip(runs["sidpt"], runs["trl"])]
                console.print("sidpt / TRL samples/s per round: " + ", ".join(f"{x:.2f}x" for x in per))
                out_rows.append({"kind": "rounds", "flat_share_target": share, "ratios": per})
            out_rows.append({"kind": "pooled", "flat_share_target": share, **{n: v for n, v in sums.items()}})
            peak = measure_peaks(repeats=5, copy_mb=256).flops  # the GEMM peak, beside each workload
            utilisation_table(console, sums, args.num_params(embeddings=False) + args.vocab_size * args.dim, peak)
            out_rows.append({"kind": "peak", "flat_share_target": share, "matmul_flops": peak})
            atomic_write(out, "".join(json.dumps(r) + "\n" for r in out_rows))  # after each workload
        console.print(f"rows: {out}" + (f"; work dir kept: {work}" if a.keep else "")
                      + (f"; load average at the start {load:.2f}" if load > 0.5 else ""))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
