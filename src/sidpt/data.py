"""Run data that any environment shares: a tokenizer for random-init models trained on the
task's text, SFT batches, and the deterministic choice of each step's prompts and seeds.

Every random choice is a pure function of (seed, step), so all ranks agree without communicating;
files are written by the main rank only (then a barrier).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch
from tensordict import TensorDict

from sidpt.batch import GROUP_ID, LOSS_MASK, PROMPT_LEN, REWARD, SEQ_LEN, TOKENS
from sidpt.dist.world import barrier
from sidpt.env.base import Episode, encode_turns
from sidpt.files import atomic_write
from sidpt.model.tokenizer import Tokenizer

EOS = "<|endoftext|>"


def task_tokenizer(texts: Callable[[], tuple[list[str], list[str]]], out_dir: str | Path, vocab_size: int,
                   is_main: bool, kind: str = "word") -> Tokenizer:
    """A tokenizer trained on ``texts()[0]`` (what the model reads and writes), with ``texts()[1]``
    (tool tags) and EOS as single tokens; cached in ``out_dir/tokenizer-<kind>-<vocab>/`` and
    shared by every run on the task. ``texts`` (``Task.tokenizer_texts``) is called only where the
    cache is built: on the main rank, when it is missing.

    ``word``: one token per word or punctuation mark (decoding joins tokens with spaces, which the
    environments' parsing ignores). A fictional name is then one or two tokens that a small model
    copies with a single attention head; byte-level BPE splits names into pieces that a
    ~1M-parameter model does not learn to copy in minutes. ``bpe``: byte-level BPE (exact round
    trip)."""
    out = Path(out_dir) / f"tokenizer-{kind}-{vocab_size}"
    if is_main and not (out / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if kind == "word":
            tok = HFTok(models.WordLevel(unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                         pre_tokenizers.Punctuation()])
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size or 1 << 20, special_tokens=[EOS, "<unk>"])
        elif kind == "bpe":
            tok = HFTok(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size or 1024, special_tokens=[EOS],
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        else:
            raise ValueError(f"model.tokenizer={kind!r}: expected 'word' or 'bpe'")
        corpus, special = texts()
        tok.train_from_iterator(corpus, trainer)
        if special:
            tok.add_tokens(list(special))  # one id per tag: the tool protocol is one token per tag
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "tokenizer_config.json", json.dumps({"eos_token": EOS, "pad_token": EOS}))
        atomic_write(out / "tokenizer.json", tok.to_str())  # last: its presence marks a complete cache
    barrier()
    return Tokenizer(out)


def episode_tensors(ep: Episode, prompt_ids: list[int], encode) -> tuple[list[int], list[bool]]:
    """Prompt + turns as ids, with the loss mask on the model-written turns only."""
    ids, mask = encode_turns(ep.turns, encode)
    return prompt_ids + ids, [False] * len(prompt_ids) + mask


def sft_batch(rows: list[tuple[list[int], list[bool]]], pad_id: int) -> TensorDict:
    """Right-padded SFT batch: TOKENS, LOSS_MASK, SEQ_LEN (PROMPT_LEN, GROUP_ID, REWARD filled)."""
    N, T = len(rows), max(len(ids) for ids, _ in rows)
    tokens = torch.full((N, T), pad_id, dtype=torch.int64)
    mask = torch.zeros(N, T, dtype=torch.bool)
    for i, (ids, m) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(m)] = torch.tensor(m)
    lens = torch.tensor([len(ids) for ids, _ in rows])
    first = torch.tensor([m.index(True) if True in m else len(m) for _, m in rows])
    return TensorDict({TOKENS: tokens, LOSS_MASK: mask, SEQ_LEN: lens, PROMPT_LEN: first,
                       GROUP_ID: torch.arange(N), REWARD: torch.zeros(N)}, batch_size=[N])


def step_indices(n_items: int, k: int, seed: int, step: int, salt: int = 0) -> list[int]:
    """The ``k`` item indices of ``step`` (without replacement inside a step), same on every rank."""
    rng = random.Random((seed * 1_000_003 + step) * 7919 + salt)
    return rng.sample(range(n_items), k) if k <= n_items else [rng.randrange(n_items) for _ in range(k)]


def episode_seed(seed: int, step: int, group: int, index: int) -> int:
    """Sampling seed of one episode: independent of which rank or batch runs it."""
    return ((seed * 1_000_003 + step) * 1_000_033 + group) * 1_009 + index


def fit_questions(questions: list, prompt_lens: list[int], max_model_len: int, policy: str, key: str) -> tuple[list, int]:
    """The questions whose prompt leaves room to generate (at least one token) under
    ``max_model_len``, and how many were left out. ``policy`` "error" raises ``ConfigError`` naming
    the first one that does not fit (its file, line and id) instead of leaving any out."""
    from sidpt.errors import ConfigError

    kept = [q for q, n in zip(questions, prompt_lens) if n < max_model_len]
    if len(kept) < len(questions) and policy == "error":
        q, n = next((q, n) for q, n in zip(questions, prompt_lens) if n >= max_model_len)
        raise ConfigError(f"{q.where or key}: question {q.id!r} has a prompt of {n} tokens, which leaves no room "
                          f"under rollout.max_model_len={max_model_len} ({len(questions) - len(kept)} such "
                          f"questions; raise it, or set task.too_long='skip' to leave them out)")
    return kept, len(questions) - len(kept)
