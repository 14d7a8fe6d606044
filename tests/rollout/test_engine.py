"""The native engine against transformers' generate and against full-sequence forwards."""

import pytest
import torch
import transformers

from sidpt.model import build_model, load_checkpoint, token_logprobs
from sidpt.model.model import ModelArgs
from sidpt.rollout import Engine, EngineConfig, Request, SamplingParams
from tests.model.hf_fixtures import hf_config, make_hf_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def prompts(n, vocab, seed=0, lo=2, hi=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def full_logprobs(model, tokens):
    """log p(token t | tokens < t) for t >= 1 by one full forward, float32."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0, :-1]
    return token_logprobs(logits, torch.tensor(tokens[1:]))


def assert_logprobs_match(model, out, atol=1e-5):
    ref = full_logprobs(model, out.tokens)
    got = torch.tensor(out.logprobs[1:])
    gen = torch.tensor(out.generated[1:])
    assert gen.sum() > 0
    assert (got[~gen] == 0).all()
    torch.testing.assert_close(got[gen], ref[gen], atol=atol, rtol=0)


def run_staggered(engine, reqs, arrive_every=2):
    """Submit requests a few at a time between steps (continuous batching), collect outputs by id."""
    pending, done, step = list(reqs), {}, 0
    while pending or engine.has_work():
        if step % arrive_every == 0:
            for _ in range(3):
                if pending:
                    engine.submit(pending.pop(0))
        for out in engine.step():
            done[out.id] = out
        step += 1
    return done


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_transformers_generate(family, tmp_path):
    hf = make_hf_model(hf_config(family, n_kv_heads=2, tied=family == "qwen2"), seed=3)
    hf.save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path)
    ps = prompts(18, model.args.vocab_size, seed=1)
    eos = hf.generation_config.eos_token_id  # llama: 2; qwen: None (never stops early)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=() if eos is None else (eos,))
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=200, max_model_len=64))
    done = run_staggered(engine, [Request(i, p, params) for i, p in enumerate(ps)])
    assert len(done) == len(ps)
    reasons = set()
    for i, p in enumerate(ps):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=12, pad_token_id=0)
        assert done[i].tokens == ref[0].tolist(), f"prompt {i}"
        assert done[i].prompt_len == len(p)
        reasons.add(done[i].finish_reason)
        assert_logprobs_match(model, done[i])
    assert "length" in reasons


def sharp_model(seed=0, vocab=61):
    """A tiny random model with peaked next-token distributions (greedy has few near-ties)."""
    model = build_model(ModelArgs(vocab_size=vocab, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
                                  intermediate_size=96), seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    return model


def test_small_cache_preempts_and_matches_unconstrained():
    model = sharp_model(seed=1)
    ps = prompts(16, model.args.vocab_size, seed=2, lo=3, hi=30)
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    big = Engine(model, EngineConfig(block_size=4, num_blocks=400, max_model_len=64))
    ref = big.generate([Request(i, p, params) for i, p in enumerate(ps)])
    assert big.stats["preemptions"] == 0
    small = Engine(model, EngineConfig(block_size=4, num_blocks=14, max_model_len=64))
    got = run_staggered(small, [Request(i, p, params) for i, p in enumerate(ps)], arrive_every=1)
    assert small.stats["preemptions"] > 0  # the cache really was too small
    for i in range(len(ps)):
        assert got[i].tokens == ref[i].tokens
        assert_logprobs_match(model, got[i])
    assert small.cache.num_free == small.cache.num_blocks and not small.seqs  # everything released


def test_cache_pressure_does_not_thrash():
    """With a cache a third of the demand, admission must leave room for running requests: each
    request is admitted about once (old scheduler: 1.5x the prefill work, ~1 preemption per request)."""
    model = sharp_model(seed=3)
    ps = prompts(32, model.args.vocab_size, seed=4, lo=40, hi=60)
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    demand_blocks = sum(-(-(len(p) + 16) // 4) for p in ps)
    ref = Engine(model, EngineConfig(block_size=4, num_blocks=2 * demand_blocks, max_model_len=96,
                                     max_seqs=32)).generate([Request(i, p, params) for i, p in enumerate(ps)])
    small = Engine(model, EngineConfig(block_size=4, num_blocks=demand_blocks // 3, max_model_len=96, max_seqs=32))
    got = small.generate([Request(i, p, params) for i, p in enumerate(ps)])
    ideal = sum(map(len, ps))
    assert [o.tokens for o in got] == [o.tokens for o in ref]
    assert small.stats["prefill_tokens"] <= 1.15 * ideal, (small.stats, ideal)
    assert small.stats["preemptions"] <= len(ps) // 4, small.stats


class CharTokenizer:
    """One token per character of a small alphabet: enough to test stop strings."""

    alphabet = "abcdefghij</>hsrc "

    @property
    def vocab_size(self):
        return len(self.alphabet)

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def test_tool_call_stop_resume_keeps_cache_and_logprobs():
    model = sharp_model(seed=4, vocab=len(CharTokenizer.alphabet))
    tok = CharTokenizer()
    # Find a stop string that this model actually generates: the text of greedy tokens 3..5.
    probe = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=96))
    prompt = [1, 2, 3, 4]
    free = probe.generate([Request("p", prompt, SamplingParams(temperature=0.0, max_new_tokens=12))])[0]
    stop = tok.decode(free.tokens[len(prompt) + 3: len(prompt) + 6])

    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=96), tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=20, stop_strings=(stop,))
    engine.submit(Request("r", prompt, params))
    outs = []
    while engine.has_work():
        outs += engine.step()
    first = outs[-1]
    assert first.finish_reason == "tool" and first.stop_string == stop
    assert tok.decode(first.tokens[len(prompt):]).endswith(stop)
    computed_before = engine.seqs["r"].num_computed
    prefill_before = engine.stats["prefill_tokens"]
    obs = [8, 9, 10, 11, 12]
    engine.resume("r", obs)
    outs = []
    while engine.has_work():
        outs += engine.step()
    final = outs[-1]
    # only the last sampled token and the observation were prefilled: the prefix stayed cached
    assert engine.stats["prefill_tokens"] - prefill_before == len(obs) + 1
    assert computed_before == len(first.tokens) - 1
    n1 = len(first.tokens)
    assert final.tokens[:n1] == first.tokens and final.tokens[n1: n1 + len(obs)] == obs
    assert final.generated[n1: n1 + len(obs)] == [False] * len(obs)
    assert final.versions[n1: n1 + len(obs)] == [-1] * len(obs)
    assert final.finish_reason in ("length", "tool")
    assert_logprobs_match(model, final)  # across the resume: one forward of the whole sequence


def test_sampling_is_reproducible_whatever_the_batch():
    model = sharp_model(seed=5)
    ps = prompts(10, model.args.vocab_size, seed=6)
    params = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=100 + i) for i in range(10)]
    alone = Engine(model, EngineConfig(block_size=4, num_blocks=200, max_model_len=64))
    solo = [alone.generate([Request(i, ps[i], params[i])])[0] for i in range(10)]
    together = Engine(model, EngineConfig(block_size=4, num_blocks=200, max_model_len=64))
    batched = run_staggered(together, [Request(i, ps[i], params[i]) for i in reversed(range(10))])
    assert [batched[i].tokens for i in range(10)] == [o.tokens for o in solo]
    assert len({tuple(o.tokens[len(p):]) for o, p in zip(solo, ps)}) == 10


def test_update_weights_bumps_version_and_matches_new_model():
    model = sharp_model(seed=6)
    new = sharp_model(seed=7)
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=100, max_model_len=64))
    p = prompts(1, model.args.vocab_size, seed=8)[0]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=1)
    engine.submit(Request("a", p, params))
    engine.step()
    engine.step()  # prefill + one decode under version 0
    sd = new.state_dict()
    names = list(sd)
    v = engine.update_weights([{k: sd[k] for k in names[:5]}, {k: sd[k] for k in names[5:]}])
    assert v == 1
    out = None
    while engine.has_work():
        out = (engine.step() or [out])[0]
    vers = [x for x, g in zip(out.versions, out.generated) if g]
    assert vers[:2] == [0, 0] and set(vers[2:]) == {1}
    after = engine.generate([Request("b", p, params)])[0]
    assert_logprobs_match(new, after)
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([{names[0]: torch.zeros(3)}])
    with pytest.raises(KeyError, match="unknown parameter 'nope'"):
        engine.update_weights([{"nope": torch.zeros(3)}])


@pytest.mark.parametrize("fmt, lo, hi", [("bf16", 1e-4, 0.1), ("fp8", 1e-3, 1.0)])
def test_emulated_precision_gives_a_small_measurable_mismatch(fmt, lo, hi):
    ref_model = sharp_model(seed=9)
    emu_model = sharp_model(seed=9)
    engine = Engine(emu_model, EngineConfig(block_size=4, num_blocks=100, max_model_len=64,
                                            precision=f"emulated-{fmt}"))
    ps = prompts(4, ref_model.args.vocab_size, seed=10)
    outs = engine.generate([Request(i, p, SamplingParams(temperature=1.0, max_new_tokens=16, seed=i))
                            for i, p in enumerate(ps)])
    errs = []
    for o in outs:
        ref = full_logprobs(ref_model, o.tokens)
        gen = torch.tensor(o.generated[1:])
        errs.append((torch.tensor(o.logprobs[1:]) - ref)[gen].abs())
    err = torch.cat(errs).mean().item()
    assert lo < err < hi, err


def test_bad_requests_are_rejected_with_a_reason():
    engine = Engine(sharp_model(), EngineConfig(block_size=4, num_blocks=8, max_model_len=64))
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit(Request("a", []))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 61\)"):
        engine.submit(Request("b", [1, 61]))
    with pytest.raises(ValueError, match="no room under max_model_len 64"):
        engine.submit(Request("c", [1] * 64))
    with pytest.raises(ValueError, match="needs up to 10 KV blocks, the cache has 8"):
        engine.submit(Request("c", [1] * 30, SamplingParams(max_new_tokens=10)))
    with pytest.raises(ValueError, match="stop_strings need an engine with a tokenizer"):
        engine.submit(Request("d", [1], SamplingParams(max_new_tokens=4, stop_strings=("x",))))
    engine.submit(Request("e", [1, 2], SamplingParams(max_new_tokens=4)))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.submit(Request("e", [1, 2], SamplingParams(max_new_tokens=4)))
    out = engine.abort("e")
    assert out.finish_reason == "abort" and out.tokens == [1, 2] and not engine.seqs


def test_static_decode_buckets_match_dynamic_decode():
    """The padded fixed-shape decode (what CUDA graphs capture) gives the dynamic path's outputs."""
    model = sharp_model(seed=11)
    ps = prompts(11, model.args.vocab_size, seed=12, lo=2, hi=40)  # batch 11 pads to 16, contexts vary
    outs = {}
    for static in (False, True):
        engine = Engine(model, EngineConfig(block_size=4, num_blocks=300, max_model_len=64, static_decode=static))
        outs[static] = engine.generate([Request(i, p, SamplingParams(temperature=1.0, max_new_tokens=4 + 2 * i,
                                                                     seed=i)) for i, p in enumerate(ps)])
        if static:  # the batch shrank as requests finished and contexts grew: several buckets
            assert {b for b, _ in engine._static} >= {16, 8, 4} and len({n for _, n in engine._static}) >= 2
    for a, b in zip(outs[False], outs[True]):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
        assert_logprobs_match(model, b)


# -- regressions of the review in issue 13 (each failed on the engine before the fix) ----------

def step_until_output(engine, limit=200):
    """Step until an output appears; a spin (no output within ``limit`` steps) fails the test."""
    for _ in range(limit):
        outs = engine.step()
        if outs:
            return outs
    raise AssertionError(f"no output in {limit} steps: {engine.cache.num_free} free blocks, "
                         f"{ {k: (s.status, s.num_computed, s.seq_len) for k, s in engine.seqs.items()} }")


def test_resumed_request_and_half_prefilled_younger_one_do_not_deadlock():
    """A pauses on its first token and resumes at once with 8 observation tokens while B's prompt is
    half prefilled: the old scheduler let neither evict the other (12/14 and 6/14 computed, 0 free
    blocks, step() returned [] forever). Each fits the 6 x 3-slot cache on its own."""
    tok = CharTokenizer()
    model = sharp_model(seed=4, vocab=len(tok.alphabet))
    a, b = [1, 2, 3, 4, 5], list(range(1, 15))
    first = Engine(model, EngineConfig(block_size=3, num_blocks=6, max_model_len=32)).generate(
        [Request("a", a, SamplingParams(temperature=0.0, max_new_tokens=1))])[0].tokens[-1]
    cfg = EngineConfig(block_size=3, num_blocks=6, max_model_len=32, max_prefill_tokens=9)
    engine = Engine(model, cfg, tokenizer=tok)
    pa = SamplingParams(temperature=0.0, max_new_tokens=4, stop_strings=(tok.decode([first]),))
    pb = SamplingParams(temperature=0.0, max_new_tokens=4)
    engine.submit(Request("A", a, pa))
    engine.submit(Request("B", b, pb))
    (out,) = step_until_output(engine)
    assert out.id == "A" and out.finish_reason == "tool"
    obs = [6, 7, 8, 9, 10, 11, 12, 13]
    engine.resume("A", obs)
    done = {}
    while len(done) < 2:
        for o in step_until_output(engine):
            done[o.id] = o
    assert engine.cache.num_free == 6 and not engine.seqs
    # the same requests alone in a large cache give the same tokens
    ref = Engine(model, EngineConfig(block_size=3, num_blocks=64, max_model_len=32), tokenizer=tok)
    assert ref.generate([Request("B", b, pb)])[0].tokens == done["B"].tokens
    ref.submit(Request("A", a, pa))
    step_until_output(ref)
    ref.resume("A", obs)
    assert step_until_output(ref)[0].tokens == done["A"].tokens
    assert_logprobs_match(model, done["A"])


def first_new_char(tok, ids):
    """(k, text): the first position whose token's text did not occur earlier in ids."""
    for k, t in enumerate(ids):
        if k > 0 and tok.decode([t]) not in tok.decode(ids[:k]):
            return k, tok.decode([t])
    raise AssertionError("every generated token repeats an earlier one")


def stop_on_kth_token():
    """(tokenizer, model, prompt, k, stop): greedy decoding of the prompt first completes the
    one-character stop string at its k-th generated token (0-based)."""
    tok = CharTokenizer()
    model = sharp_model(seed=4, vocab=len(tok.alphabet))
    prompt = [1, 2, 3, 4]
    free = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=96)).generate(
        [Request("p", prompt, SamplingParams(temperature=0.0, max_new_tokens=16))])[0]
    k, stop = first_new_char(tok, free.tokens[len(prompt):])
    return tok, model, prompt, k, stop


def test_stop_string_on_the_last_allowed_token_finishes_as_length():
    """The stop-string test came before the max_new_tokens test: a tool call on the last allowed
    token paused as "tool", resume() took it, and the request sampled past max_new_tokens."""
    tok, model, prompt, k, stop = stop_on_kth_token()
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=96), tokenizer=tok)
    engine.submit(Request("r", prompt, SamplingParams(temperature=0.0, max_new_tokens=k + 1, stop_strings=(stop,))))
    (out,) = step_until_output(engine)
    assert sum(out.generated) == k + 1 and out.finish_reason == "length" and not engine.seqs
    # one token more budget: the same token is a tool call; the budget is checked on resume
    engine.submit(Request("s", prompt, SamplingParams(temperature=0.0, max_new_tokens=k + 2, stop_strings=(stop,))))
    (out,) = step_until_output(engine)
    assert out.finish_reason == "tool" and out.stop_string == stop
    assert engine.max_observation("s") == 96 - len(out.tokens) - 1
    engine.resume("s", [5, 6])
    (out,) = step_until_output(engine)
    assert sum(out.generated) == k + 2 and out.finish_reason == "length"


def test_run_episodes_never_exceeds_max_new_tokens_over_turns():
    """Every turn of a scripted environment answers with an observation; whatever the stops, no
    episode generates more than max_new_tokens over all its turns (the old engine: 41 of 40)."""
    from sidpt.rollout.multiturn import Job, run_episodes

    tok = CharTokenizer()

    class Echo:
        stop_strings = (" ",)

        def reset(self, sample):
            return {}

        def step(self, state, text):
            return type("R", (), {"done": False, "observation": "ab", "reward": 0.0, "info": {}})()

        def end(self, state, reason):
            return type("R", (), {"done": True, "observation": "", "reward": 0.0, "info": {"finish": reason}})()

    model = sharp_model(seed=4, vocab=len(tok.alphabet))
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=200, max_model_len=128), tokenizer=tok)
    encode = lambda text: [tok.alphabet.index(c) for c in text]  # noqa: E731
    jobs = [Job(g, 0, None, [1 + g % 9, 2, 3], seed=g) for g in range(24)]
    eps = run_episodes(engine, Echo(), jobs, SamplingParams(temperature=1.0, max_new_tokens=10), encode, tok.decode)
    turns = [e.out.tokens.count(0) for e in eps]  # every observation starts with "a" (id 0)
    assert max(turns) >= 2  # several episodes really were multi-turn
    assert all(sum(e.out.generated) <= 10 for e in eps), [sum(e.out.generated) for e in eps]
    assert sum(sum(e.out.generated) == 10 for e in eps) >= 1


def test_static_decode_with_one_token_prefill_chunks_matches_dynamic():
    """One-token prefill chunks (max_prefill_tokens=1) took the padded decode path, which sampled
    from inside the prompt; they are prefill, not decode, in the outputs and in the counts."""
    model = sharp_model(seed=11)
    ps = prompts(5, model.args.vocab_size, seed=13, lo=3, hi=12)
    outs, stats = {}, {}
    for static in (False, True):
        engine = Engine(model, EngineConfig(block_size=4, num_blocks=100, max_model_len=64, max_prefill_tokens=1,
                                            static_decode=static))
        outs[static] = engine.generate([Request(i, p, SamplingParams(temperature=1.0, max_new_tokens=5, seed=i))
                                        for i, p in enumerate(ps)])
        stats[static] = engine.stats
    ref = Engine(model, EngineConfig(block_size=4, num_blocks=100, max_model_len=64)).generate(
        [Request(i, p, SamplingParams(temperature=1.0, max_new_tokens=5, seed=i)) for i, p in enumerate(ps)])
    for a, b, r in zip(outs[False], outs[True], ref):
        assert a.tokens == b.tokens == r.tokens
        assert_logprobs_match(model, b)
    for st in stats.values():  # every prompt token is prefill, every later token (but the last) decode
        assert st["prefill_tokens"] == sum(map(len, ps)) and st["decode_tokens"] == len(ps) * 4, st


def test_paused_requests_do_not_starve_new_ones():
    """max_seqs paused requests held every row, so a new request never started; now a paused
    request's row moves aside (tokens kept off the row, KV blocks kept) and comes back on resume."""
    tok, model, prompt, k, stop = stop_on_kth_token()
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=96, max_seqs=2), tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=k + 8, stop_strings=(stop,))
    for rid in ("a", "b"):
        engine.submit(Request(rid, prompt, params))
    paused = {}
    while len(paused) < 2:
        paused.update((o.id, o) for o in step_until_output(engine))
    assert set(paused) == {"a", "b"} and all(o.finish_reason == "tool" for o in paused.values())
    engine.submit(Request("c", [5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=6)))
    (c,) = step_until_output(engine)
    assert c.id == "c" and c.finish_reason == "length" and engine.stats["row_swaps"] >= 1
    computed = engine.stats["prefill_tokens"]
    obs = [8, 9, 10]
    for rid in ("a", "b"):
        engine.resume(rid, obs)
    finals = {}
    while engine.has_work():
        for o in engine.step():
            finals[o.id] = o
            if o.finish_reason == "tool":
                engine.release(o.id)
    # the KV cache of both stayed: only the last sampled token and the observation were prefilled
    assert engine.stats["prefill_tokens"] - computed == 2 * (len(obs) + 1)
    for rid in ("a", "b"):
        assert finals[rid].tokens[: len(paused[rid].tokens) + len(obs)] == paused[rid].tokens + obs
        assert_logprobs_match(model, finals[rid])


def test_stop_strings_split_over_byte_tokens_are_found():
    """A byte-level tokenizer splits a multi-byte character over tokens: no single token's text
    holds it (the old trigger test never fired) and the old look-back of len(stop) + 2 tokens was
    shorter than its 6 bytes."""
    from sidpt.rollout.engine import stop_completed

    class Bytes:
        vocab_size = 256

        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stop = "答案"
    ids = list("x=".encode()) + list(stop.encode())
    engine = Engine(sharp_model(vocab=256), EngineConfig(block_size=4, num_blocks=8, max_model_len=64),
                    tokenizer=Bytes())
    trig = engine._trigger_ids(stop)
    assert ids[-1] in trig and ord("x") not in trig
    assert stop_completed(Bytes(), ids, stop)
    assert not stop_completed(Bytes(), ids[:-1], stop) and not stop_completed(Bytes(), ids + [65], stop)


def test_vocabulary_is_decoded_once_per_tokenizer():
    """The trigger sets came from decoding every vocabulary entry once per stop string (about 150k
    tokenizer calls each for a real vocabulary)."""

    class Counting(CharTokenizer):
        calls = 0

        def decode(self, ids):
            Counting.calls += 1
            return super().decode(ids)

    tok = Counting()
    model = sharp_model(vocab=len(tok.alphabet))
    for _ in range(2):
        engine = Engine(model, EngineConfig(block_size=4, num_blocks=8, max_model_len=64), tokenizer=tok)
        for stop in ("</", "a>", "c"):
            engine.submit(Request(stop, [1, 2], SamplingParams(max_new_tokens=2, stop_strings=(stop,))))
    assert Counting.calls == tok.vocab_size


def test_bad_engine_configs_are_rejected():
    for key, value in (("block_size", 0), ("max_prefill_tokens", 0), ("max_seqs", 0), ("max_model_len", 1)):
        with pytest.raises(ValueError, match=f"EngineConfig.{key}={value}"):
            EngineConfig(**{key: value})


def test_a_groups_shared_prompt_is_prefilled_once_and_matches_separate_requests():
    """8 samples of one prompt (a GRPO group) and 2 of another, in one admission: each prompt's
    K/V are computed once and copied; every output (tokens, logprobs) equals the same request run
    alone (float64: to 1e-12)."""
    model = build_model(ModelArgs(vocab_size=64), dtype=torch.float64, seed=2)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 64, (11,), generator=g).tolist(), torch.randint(0, 64, (7,), generator=g).tolist()
    reqs = [Request(i, a if i < 8 else b, SamplingParams(temperature=1.0, max_new_tokens=6, seed=100 + i))
            for i in range(10)]
    engine = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=32))
    outs = engine.generate(reqs)
    assert engine.stats["shared_prefill_tokens"] == 7 * len(a) + 1 * len(b)
    assert len({tuple(o.tokens) for o in outs[:8]}) > 1  # the samples differ after the shared prompt
    for r, o in zip(reqs, outs):
        alone = Engine(model, EngineConfig(block_size=4, num_blocks=64, max_model_len=32)).generate([r])[0]
        assert alone.tokens == o.tokens
        assert max(abs(x - y) for x, y in zip(alone.logprobs, o.logprobs)) <= 1e-12


def test_the_engines_inference_mode_leaves_a_shared_model_trainable():
    """The engine steps under torch.inference_mode; a model it ran first (its RoPE table cached
    inside that mode: an inference tensor, which autograd never has to save) still trains."""
    model = build_model(ModelArgs(vocab_size=64), seed=3)
    Engine(model, EngineConfig(block_size=4, num_blocks=16, max_model_len=16)).generate(
        [Request(0, [1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=3, seed=1))])
    model.train()
    loss = model(torch.tensor([[1, 2, 3, 4, 5]])).log_softmax(-1)[0, :-1, 0].sum()
    loss.backward()
    g = model.embed_tokens.weight.grad
    assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0
