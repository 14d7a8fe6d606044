"""The native rollout engine: paged KV cache, continuous batching, per-token logprobs, multi-turn.

    engine = Engine(model, EngineConfig(...), tokenizer=tok)       # the trainer's model class
    engine.submit(Request("q1", prompt_ids, SamplingParams(stop_strings=("</search>",))))
    while engine.has_work():
        for out in engine.step():                                  # finished or paused requests
            if out.finish_reason == "tool":                        # stopped at </search>
                engine.resume(out.id, observation_ids)             # KV cache kept, no re-prefill
    engine.update_weights([bucket1, bucket2])                      # in place; policy_version += 1

Every step the scheduler (1) makes room for the running requests' next token, oldest first,
preempting the youngest request when blocks run out (its blocks are freed; it is recomputed later
from its tokens, which are kept), then (2) admits waiting requests' prompt (and observation)
tokens, oldest first, up to a token budget. The step then runs at most two forwards of the same
model: one over every decoding request (one token each) and one over the prefilling ones (a chunk
of tokens each), and samples a token for every request whose known tokens are now all in the
cache. No Python loop touches a tensor per request: per-request state lives in row-indexed
buffers and each step gathers them.

Progress: every request that ``submit`` and ``resume`` accept fits the cache on its own, and
every step computes at least one token while any request is not paused. The oldest running
request may evict every other one; when nothing runs, the oldest waiting request may evict every
paused request and every younger one and take the rows of paused and younger waiting requests
(a row is metadata: its contents move to the request and back, its KV blocks stay). ``step``
raises instead of returning nothing while work is left.

Token-in/token-out: outputs carry token ids, never re-tokenised text. A request that hits one of
its stop strings pauses (finish_reason "tool") and keeps its row and KV blocks; ``resume``
appends observation tokens (marked not generated) and prefills only those.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Hashable, Iterable

import torch

from kernels import backend as kernel_backend
from sidpt.flops import decode_step_cost, prefill_cost
from sidpt.model import numerics
from sidpt.model.model import Transformer
from sidpt.rollout.kv_cache import PagedAttention, PagedKVCache, build_attention
from sidpt.rollout.precision import FORMATS, install_activation_rounding, round_weights
from sidpt.rollout.sampling import SamplingParams, sample, uniform

WAITING, RUNNING, PAUSED = "waiting", "running", "paused"


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: derived from kv_cache_mb
    kv_cache_mb: float = 512.0
    max_seqs: int = 256  # requests holding a row (running, prefilling or paused) at once
    max_model_len: int = 2048  # prompt + all turns
    max_prefill_tokens: int = 2048  # prompt tokens computed per step (chunked prefill beyond)
    precision: str = "native"  # native | emulated-bf16 | emulated-fp16 | emulated-fp8
    seed: int = 0  # draws the seed of requests that bring none
    cuda_graphs: bool = True  # on CUDA: capture decode steps as CUDA graphs (ignored on CPU)
    static_decode: bool = False  # pad decode batches to fixed (batch, context) buckets; on with graphs
    # decode attention through kernels/paged_attention.py (the KV blocks read in place, no gather);
    # None: where it compiles (a GPU with triton). True elsewhere: the interpreter, or torch's gather
    paged_kernel: bool | None = None
    # matmul operand order of the model given (it is set on that model: give the engine its own copy,
    # as the controller does): "auto" = weight-left on CPU where model.use_weight_left measured it
    # faster (few-row decode products of big weights), F.linear elsewhere; "linear"; "weight-left"
    matmul: str = "auto"

    def __post_init__(self):
        for name, lo in (("block_size", 1), ("num_blocks", 0), ("max_seqs", 1), ("max_model_len", 2),
                         ("max_prefill_tokens", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)}: must be >= {lo}")
        if self.matmul not in ("auto", "linear", "weight-left"):
            raise ValueError(f"matmul={self.matmul!r}: auto, linear or weight-left")
        if self.precision != "native" and self.precision.removeprefix("emulated-") not in FORMATS:
            raise ValueError(f"precision={self.precision!r}: native or emulated-{{{', '.join(FORMATS)}}}")


@dataclass
class Request:
    id: Hashable
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Output:
    id: Hashable
    tokens: list[int]  # prompt + every turn so far (generated and observation tokens)
    prompt_len: int
    logprobs: list[float]  # log mu of each generated token; 0.0 elsewhere
    generated: list[bool]  # True where the engine sampled the token
    versions: list[int]  # policy version that sampled each token; -1 where not generated
    finish_reason: str  # stop | length | tool | abort
    stop_string: str | None = None


@dataclass
class _Seq:
    req: Request
    arrival: int
    seed: int
    status: str = WAITING
    row: int = -1
    blocks: list[int] = field(default_factory=list)
    seq_len: int = 0  # tokens known (prompt, generated, observations)
    num_computed: int = 0  # tokens whose K/V are in the cache
    n_gen: int = 0  # tokens generated over all turns (the sampling counter)
    turn: list[int] = field(default_factory=list)  # ids generated in the current turn (stop strings)
    saved: tuple[torch.Tensor, ...] | None = None  # (tokens, logprobs, generated, versions) off a row


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig = EngineConfig(),
                 tokenizer=None, device: str | torch.device | None = None):
        self.model, self.cfg, self.tokenizer = model.eval(), config, tokenizer
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        a = model.args
        model.set_weight_left(config.matmul == "weight-left" or (config.matmul == "auto" and self.device.type == "cpu"))
        self.fmt = None if config.precision == "native" else config.precision.removeprefix("emulated-")
        self.exact = model.numerics == "exact"  # batch-invariant forward (sidpt.model.numerics)
        if self.exact and self.fmt is not None:
            raise ValueError(f"precision={config.precision!r}: a model in exact numerics runs natively")
        if self.fmt is not None:
            if p.dtype != torch.float32:
                raise ValueError(f"precision={config.precision!r} emulates on a float32 model, got {p.dtype}")
            round_weights(model, self.fmt)
            install_activation_rounding(model, self.fmt)
        num_blocks = config.num_blocks or int(
            config.kv_cache_mb * 2**20
            // (PagedKVCache.bytes_per_token(a.n_layers, a.n_kv_heads, a.head_dim, p.dtype) * config.block_size)
        )
        self.cache = PagedKVCache(a.n_layers, a.n_kv_heads, a.head_dim, num_blocks, config.block_size,
                                  p.dtype, self.device)
        R, T = config.max_seqs, config.max_model_len
        self.max_blocks = -(-T // config.block_size)
        dev = self.device
        self.tok_buf = torch.zeros(R, T, dtype=torch.int64, device=dev)
        self.lp_buf = torch.zeros(R, T, dtype=torch.float32, device=dev)
        self.gen_buf = torch.zeros(R, T, dtype=torch.bool, device=dev)
        self.ver_buf = torch.full((R, T), -1, dtype=torch.int32, device=dev)
        self.block_table = torch.full((R, self.max_blocks), num_blocks, dtype=torch.int64, device=dev)
        self.temperature = torch.ones(R, device=dev)
        self.top_k = torch.zeros(R, dtype=torch.int64, device=dev)
        self.top_p = torch.ones(R, device=dev)
        self.seeds = torch.zeros(R, dtype=torch.int64, device=dev)
        self.stop_ids = torch.full((R, 8), -1, dtype=torch.int64, device=dev)
        self.free_rows = list(range(R - 1, -1, -1))
        self.seqs: dict[Hashable, _Seq] = {}
        self.policy_version = 0
        self._arrivals = itertools.count()
        self._seed_gen = torch.Generator().manual_seed(config.seed)
        self._triggers: dict[str, frozenset[int]] = {}  # stop string -> ids that can complete it
        self.stats = {"preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "row_swaps": 0,
                      "shared_prefill_tokens": 0,  # prefill tokens copied from an identical chunk
                      "flops": 0.0, "bytes": 0.0, "roofline_s": 0.0}  # the model's work so far (``_account``)
        self.elem_bytes = next(model.parameters()).element_size()
        self.peaks = None  # the device's peaks, for stats["roofline_s"] (``sidpt.flops.Peaks``)
        # exact numerics builds its attention blocks from the step's lengths on the host: no capture
        self.use_graphs = config.cuda_graphs and self.device.type == "cuda" and not self.exact
        self.static_decode = config.static_decode or self.use_graphs
        self.paged_kernel = (kernel_backend(self.device) == "triton" if config.paged_kernel is None
                             else config.paged_kernel) and not self.exact
        self._static: dict[tuple[int, int], _StaticDecode] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    # -- requests -------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        if req.id in self.seqs:
            raise ValueError(f"request id {req.id!r} is already in the engine")
        if not req.prompt:
            raise ValueError(f"request {req.id!r}: empty prompt")
        V = self.model.args.vocab_size
        if min(req.prompt) < 0 or max(req.prompt) >= V:
            raise ValueError(f"request {req.id!r}: token ids must lie in [0, {V})")
        P, cap = len(req.prompt), self.cfg.max_model_len
        if P >= cap:
            raise ValueError(f"request {req.id!r}: prompt of {P} tokens leaves no room under max_model_len {cap}")
        need = self.cache.blocks_for(min(P + req.params.max_new_tokens, cap))
        if need > self.cache.num_blocks:
            raise ValueError(f"request {req.id!r}: needs up to {need} KV blocks, the cache has "
                             f"{self.cache.num_blocks}")
        if len(req.params.stop_token_ids) > self.stop_ids.shape[1]:
            raise ValueError(f"request {req.id!r}: at most {self.stop_ids.shape[1]} stop_token_ids")
        sp = req.params
        if self.exact and (sp.temperature not in (0.0, 1.0) or sp.top_k or sp.top_p < 1):
            raise ValueError(f"request {req.id!r}: exact numerics samples at temperature 1 (or 0) without top-k/top-p "
                             f"(the trainer scores the untempered, untruncated distribution), got temperature="
                             f"{sp.temperature}, top_k={sp.top_k}, top_p={sp.top_p}")
        if req.params.stop_strings and self.tokenizer is None:
            raise ValueError(f"request {req.id!r}: stop_strings need an engine with a tokenizer")
        seed = req.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))
        for stop in req.params.stop_strings:
            self._trigger_ids(stop)  # built once per stop string, before the hot loop
        self.seqs[req.id] = _Seq(req, next(self._arrivals), seed, seq_len=P)

    def max_observation(self, rid: Hashable) -> int:
        """The longest observation ``resume(rid, ...)`` accepts (-1: it cannot resume at all): room
        for one more token under ``max_model_len``, and the whole request, the rest of its
        ``max_new_tokens`` included, still fits the KV cache on its own (so progress holds)."""
        s = self.seqs.get(rid)
        if s is None or s.status != PAUSED or s.n_gen >= s.req.params.max_new_tokens:
            return -1
        cap, rest = self.cfg.max_model_len, s.req.params.max_new_tokens - s.n_gen
        room = self.cache.num_blocks * self.cache.block_size  # tokens the whole cache holds
        by_len = cap - s.seq_len - 1
        by_cache = by_len if cap <= room else room - s.seq_len - rest
        return max(min(by_len, by_cache), -1)

    def resume(self, rid: Hashable, observation: list[int]) -> None:
        """Append observation tokens (not generated) to a paused request and let it generate again."""
        s = self.seqs.get(rid)
        if s is None or s.status != PAUSED:
            raise ValueError(f"request {rid!r} is not paused at a tool call")
        n = len(observation)
        if s.n_gen >= s.req.params.max_new_tokens:
            raise ValueError(f"request {rid!r}: its max_new_tokens={s.req.params.max_new_tokens} are spent")
        if s.seq_len + n + 1 > self.cfg.max_model_len:
            raise ValueError(f"request {rid!r}: observation of {n} tokens overflows max_model_len")
        if n > self.max_observation(rid):
            raise ValueError(f"request {rid!r}: observation of {n} tokens makes the request larger than the "
                             f"KV cache ({self.cache.num_blocks} blocks of {self.cache.block_size})")
        if n:
            if min(observation) < 0 or max(observation) >= self.model.args.vocab_size:
                raise ValueError(f"request {rid!r}: observation ids must lie in [0, {self.model.args.vocab_size})")
            obs = torch.tensor(observation, device=self.device)
            if s.row >= 0:
                self.tok_buf[s.row, s.seq_len: s.seq_len + n] = obs
            else:
                tok, lp, gen, ver = s.saved
                s.saved = (torch.cat([tok, obs]), torch.cat([lp, lp.new_zeros(n)]),
                           torch.cat([gen, gen.new_zeros(n)]), torch.cat([ver, ver.new_full((n,), -1)]))
        s.seq_len += n
        s.turn = []
        s.status = WAITING

    def release(self, rid: Hashable) -> None:
        """Drop a paused request (the episode ended at a tool call) and free its memory."""
        s = self.seqs.pop(rid)
        self._free(s)

    def abort(self, rid: Hashable) -> Output:
        s = self.seqs[rid]
        out = self._output(s, "abort")
        self.release(rid)
        return out

    def has_work(self) -> bool:
        return any(s.status != PAUSED for s in self.seqs.values())

    def generate(self, requests: Iterable[Request]) -> list[Output]:
        """Submit and run to completion (no tool calls): outputs in submission order."""
        return run_to_completion(self, requests)

    # -- weights --------------------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[dict[str, torch.Tensor]], version: int | None = None) -> int:
        """Copy full tensors (sidpt names) into the model in place, bucket by bucket; bump the version."""
        params = dict(self.model.named_parameters())
        for bucket in buckets:
            for name, t in bucket.items():
                if name not in params:
                    raise KeyError(f"update_weights: unknown parameter {name!r}")
                if tuple(t.shape) != tuple(params[name].shape):
                    raise ValueError(f"update_weights: {name!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(params[name].shape)}")
                if t.data_ptr() != params[name].data_ptr():  # received in place already: no self-copy
                    params[name].copy_(t)
        if self.fmt is not None:
            round_weights(self.model, self.fmt)
        self.policy_version = self.policy_version + 1 if version is None else version
        return self.policy_version

    def drop_cache(self) -> int:
        """Free every request's KV blocks (requests keep their tokens, log-probs and versions):
        each recomputes its cache with the current weights when next scheduled, as after a
        preemption. The ``recompute`` answer to in-flight weights; returns the tokens to recompute."""
        n = 0
        for s in self.seqs.values():
            if s.blocks:
                n += s.num_computed
                self._preempt(s, count=False)  # not the scheduler's doing
        return n

    # -- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Output]:
        """One scheduling round and up to two forwards; returns requests that finished or paused.
        Under inference mode (no autograd bookkeeping at all): 5-7% faster than no_grad at the peer
        benchmark's shape (16 rows, alternating in one run)."""
        decode, prefill = self._schedule()
        if not decode and not prefill and self.has_work():  # the scheduler guarantees this never happens
            state = {k: (s.status, s.num_computed, s.seq_len, len(s.blocks)) for k, s in self.seqs.items()}
            raise RuntimeError(f"engine made no progress: {self.cache.num_free} free blocks, {state}")
        outs: list[Output] = []
        if decode:
            outs += self._run(decode, [1] * len(decode), is_decode=True)
        if prefill:
            outs += self._run([s for s, _ in prefill], [n for _, n in prefill], is_decode=False)
        self.stats["steps"] += 1
        return outs

    def _schedule(self) -> tuple[list[_Seq], list[tuple[_Seq, int]]]:
        """(decode: running requests with room for one more token, prefill: (request, chunk length)).

        Priority is arrival order (oldest first). Rules, and why:
        - a running request short of blocks evicts paused requests (idle) first, then the
          youngest request younger than itself; with none left it waits itself;
        - admission keeps one free block per decoding request and, while anything else runs this
          step, evicts only paused requests younger than the newcomer: admitting into the last free
          blocks only got the newcomer preempted by the next decode step and recomputed
          (tools/bench_rollout.py --thrash, cache = 1/3 of the demand: 65 -> 4 preemptions,
          prefill 1.55x -> 1.07x the ideal);
        - when nothing else runs, the oldest waiting request evicts every paused request and every
          younger one that holds blocks, then computes what fits: it fits alone (``submit`` and
          ``resume`` check), so the step makes progress (a younger request half-prefilled while an
          older one resumed had deadlocked the old scheduler: both waiting, 0 free blocks)."""
        running = sorted((s for s in self.seqs.values() if s.status == RUNNING), key=lambda s: s.arrival)
        decode = []
        while running:
            s = running.pop(0)
            need = self.cache.blocks_for(s.seq_len) - len(s.blocks)
            while need > self.cache.num_free and (v := self._victim(s, decode, paused_any_age=True,
                                                                    younger=True)) is not None:
                if v in running:
                    running.remove(v)
                self._preempt(v)
            if need > self.cache.num_free:
                self._preempt(s)  # nothing left to evict: s itself waits
                continue
            self._grow(s, need)
            decode.append(s)
        budget = self.cfg.max_prefill_tokens
        reserve = len(decode)
        prefill: list[tuple[_Seq, int]] = []
        for s in sorted((s for s in self.seqs.values() if s.status == WAITING), key=lambda s: s.arrival):
            if budget <= 0:
                break
            alone = not decode and not prefill  # nothing else runs this step: s must make progress
            if s.row < 0 and not self._take_row(s, [*decode, *(p for p, _ in prefill)]):
                break
            n = min(s.seq_len - s.num_computed, budget)
            need = self.cache.blocks_for(s.num_computed + n) - len(s.blocks)
            while need + reserve > self.cache.num_free and (v := self._victim(
                    s, [], paused_any_age=alone, younger=alone)) is not None:
                self._preempt(v)
            if need + reserve > self.cache.num_free:
                if not alone:
                    break  # wait for running requests to finish rather than thrash
                n = (len(s.blocks) + self.cache.num_free) * self.cache.block_size - s.num_computed
                need = self.cache.blocks_for(s.num_computed + n) - len(s.blocks)
            self._grow(s, need)
            prefill.append((s, n))
            budget -= n
        return decode, prefill

    def _victim(self, s: _Seq, scheduled: list[_Seq], paused_any_age: bool, younger: bool) -> _Seq | None:
        """Whose blocks to free for s: the youngest paused request (idle; any age, or only those
        younger than s), else with ``younger`` the youngest request younger than s, else None.
        Requests in ``scheduled`` (already given room this step) are never chosen."""
        held = [v for v in self.seqs.values() if v.blocks and v is not s and v not in scheduled]
        paused = [v for v in held if v.status == PAUSED and (paused_any_age or v.arrival > s.arrival)]
        if paused:
            return max(paused, key=lambda v: v.arrival)
        pool = [v for v in held if younger and v.arrival > s.arrival]
        return max(pool, key=lambda v: v.arrival) if pool else None

    def _take_row(self, s: _Seq, scheduled: list[_Seq]) -> bool:
        """Give s a row: a free one, else the row of the youngest paused request, else of the youngest
        younger waiting request (not scheduled this step). The evicted request keeps its tokens and
        KV blocks off the row (``saved``) and gets a row back when it is next admitted."""
        if not self.free_rows:
            cands = [v for v in self.seqs.values() if v.row >= 0 and v not in scheduled
                     and (v.status == PAUSED or (v.status == WAITING and v.arrival > s.arrival))]
            if not cands:
                return False
            v = max(cands, key=lambda v: (v.status == PAUSED, v.arrival))
            r = v.row
            v.saved = tuple(t.clone() for t in self._row_state(r, v.seq_len))
            self.block_table[r].fill_(self.cache.scratch_block)
            self.free_rows.append(r)
            v.row = -1
            self.stats["row_swaps"] += 1
        self._assign_row(s)
        return True

    def _preempt(self, s: _Seq, count: bool = True) -> None:
        """Free s's blocks; it keeps its tokens and is recomputed when readmitted."""
        self.cache.release(s.blocks)
        s.blocks = []
        if s.row >= 0:
            self.block_table[s.row].fill_(self.cache.scratch_block)
        s.num_computed = 0
        if s.status == RUNNING:
            s.status = WAITING
        self.stats["preemptions"] += count

    def _grow(self, s: _Seq, n: int) -> None:
        if n <= 0:
            return
        new = self.cache.allocate(n)
        first = len(s.blocks)
        s.blocks += new
        self.block_table[s.row, first: first + n] = torch.tensor(new, device=self.device)

    def _assign_row(self, s: _Seq) -> None:
        r = s.row = self.free_rows.pop()
        p = s.req.params
        self.lp_buf[r].zero_()
        self.gen_buf[r].zero_()
        self.ver_buf[r].fill_(-1)
        if s.saved is None:
            P = len(s.req.prompt)
            self.tok_buf[r, :P] = torch.tensor(s.req.prompt, device=self.device)
        else:  # back from a row swap: its tokens, logprobs, flags, versions and blocks
            for buf, saved in zip(self._row_state(r, s.seq_len), s.saved):
                buf.copy_(saved)
            if s.blocks:
                self.block_table[r, : len(s.blocks)] = torch.tensor(s.blocks, device=self.device)
            s.saved = None
        self.temperature[r], self.top_k[r], self.top_p[r], self.seeds[r] = p.temperature, p.top_k, p.top_p, s.seed
        self.stop_ids[r].fill_(-1)
        if p.stop_token_ids:
            self.stop_ids[r, : len(p.stop_token_ids)] = torch.tensor(p.stop_token_ids, device=self.device)

    def _account(self, seqs: list, ns: list[int], starts: list[int], is_decode: bool) -> None:
        """The step's model FLOPs and memory bytes (``sidpt.flops``: every weight read once, each
        sequence's KV cache read, dense attention), into ``stats["flops"]`` / ``stats["bytes"]``.
        A prefill chunk that copies a shared prompt's KV (``shared_prefill_tokens``) is charged
        like any other: the figures are the model's work, not the engine's shortcuts. With
        ``peaks`` (``sidpt.flops.Peaks``, set by the controller) each forward also adds its
        roofline time to ``stats["roofline_s"]``: the sum of per-forward maxima, not the max of sums."""
        args, elem = self.model.args, self.elem_bytes
        cost = decode_step_cost(args, starts, elem) if is_decode else prefill_cost(args, ns, starts, elem)
        self.stats["flops"] += cost.flops
        self.stats["bytes"] += cost.bytes
        if self.peaks is not None:  # this forward's roofline time: compute- or memory-bound, whichever is slower
            self.stats["roofline_s"] += max(cost.flops / self.peaks.flops, cost.bytes / self.peaks.bytes)

    def _row_state(self, r: int, n: int) -> tuple[torch.Tensor, ...]:
        """Views of row r's first n tokens, log-probs, generated flags and versions."""
        return self.tok_buf[r, :n], self.lp_buf[r, :n], self.gen_buf[r, :n], self.ver_buf[r, :n]

    def _free(self, s: _Seq) -> None:
        if s.blocks:
            self.cache.release(s.blocks)
            s.blocks = []
        if s.row >= 0:
            self.block_table[s.row].fill_(self.cache.scratch_block)
            self.free_rows.append(s.row)
            s.row = -1
        s.saved = None

    def _run(self, seqs: list[_Seq], ns: list[int], is_decode: bool) -> list[Output]:
        """Compute tokens [num_computed, num_computed + n) of each seq; sample where the seq is complete.

        ``is_decode``: the running requests' one-token steps (the padded static path may take them);
        a one-token prefill chunk is not a decode step: it may stop short of the sequence's end."""
        dev = self.device
        rows = torch.tensor([s.row for s in seqs], device=dev)
        starts = [s.num_computed for s in seqs]
        start = torch.tensor(starts, device=dev)
        done = [s.num_computed + n == s.seq_len for s, n in zip(seqs, ns)]
        for s, n in zip(seqs, ns):
            s.num_computed += n
            s.status = RUNNING if s.num_computed == s.seq_len else WAITING
        self.stats["decode_tokens" if is_decode else "prefill_tokens"] += sum(ns)
        self._account(seqs, ns, starts, is_decode)
        if is_decode and self.static_decode:
            logits = self._decode_static(rows, start, max(starts) + 1)  # [B, V]
            idx = list(range(len(seqs)))
        else:
            src = list(range(len(seqs))) if is_decode else self._shared_chunks(seqs, starts, ns)
            lead = [i for i, j in enumerate(src) if j == i]  # the seqs whose chunk this forward computes
            at = {i: k for k, i in enumerate(lead)}
            li = torch.tensor(lead, device=dev)
            lr, n_new = rows[li], torch.tensor([ns[i] for i in lead], device=dev)
            attn, positions = build_attention(self.cache, self.block_table[lr], start[li], n_new,
                                              max(ns[i] for i in lead), self.exact, self.paged_kernel)
            tokens = self.tok_buf[lr[:, None], positions]  # [B, Tq]
            hidden = self.model.forward_hidden(tokens, positions, attn)  # [B, Tq, D]
            if len(lead) < len(seqs):
                self._copy_chunks(seqs, ns, src)
            idx = [i for i, d in enumerate(done) if d]
            if not idx:
                return []
            sel = torch.tensor([at[src[i]] for i in idx], device=dev)  # a follower samples from its leader's state
            logits = self.model.logits(hidden[sel, n_new[sel] - 1])  # [b, V]
            rows = rows[torch.tensor(idx, device=dev)]
        sseqs = [seqs[i] for i in idx]
        counter = torch.tensor([s.n_gen for s in sseqs], device=dev)
        u = uniform(self.seeds[rows], counter)
        logq = numerics.log_softmax(logits) if self.exact else None  # [b, V]
        tok, lp = sample(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], u, logq)
        pos = torch.tensor([s.seq_len for s in sseqs], device=dev)
        self.tok_buf[rows, pos] = tok
        self.lp_buf[rows, pos] = lp.float()  # float64 models: stored as float32, like every rollout_logprobs
        self.gen_buf[rows, pos] = True
        self.ver_buf[rows, pos] = self.policy_version
        is_stop = (self.stop_ids[rows] == tok[:, None]).any(-1)  # [b]
        tok_list, stop_list = tok.tolist(), is_stop.tolist()  # the step's one device sync
        outs = []
        for s, t, stop in zip(sseqs, tok_list, stop_list):
            s.seq_len += 1
            s.n_gen += 1
            s.turn.append(t)
            reason, stop_str = None, None
            if stop:
                reason = "stop"
            elif s.n_gen >= s.req.params.max_new_tokens or s.seq_len >= self.cfg.max_model_len:
                reason = "length"  # before stop strings: a tool call on the last allowed token cannot resume
            elif s.req.params.stop_strings and (stop_str := self._stop_string(s, t)) is not None:
                reason = "tool"
            if reason is not None:
                outs.append(self._finish(s, reason, stop_str))
        return outs

    def _shared_chunks(self, seqs: list[_Seq], starts: list[int], ns: list[int]) -> list[int]:
        """For each prefill chunk, the index of the first chunk in this step with the same tokens
        from position 0 (a GRPO group's prompt, submitted once per sample): its K/V are computed
        once and copied (``_copy_chunks``), and the followers sample from the leader's last hidden
        state with their own seeds. The peer benchmark's 2 x 8 samples of a 27-token prompt
        prefill 54 tokens instead of 432."""
        first: dict[tuple[int, ...], int] = {}
        src = []
        for i, (s, st, n) in enumerate(zip(seqs, starts, ns)):
            key = tuple(s.req.prompt[:n]) if st == 0 and n <= len(s.req.prompt) else None
            src.append(i if key is None else first.setdefault(key, i))
        return src

    def _copy_chunks(self, seqs: list[_Seq], ns: list[int], src: list[int]) -> None:
        """Copy the K/V of each follower's chunk (positions 0..n-1) from its leader's slots, every layer."""
        bs = self.cache.block_size
        fol = [i for i, j in enumerate(src) if j != i]
        pos = torch.cat([torch.arange(ns[i], device=self.device) for i in fol])
        dst_row = torch.cat([torch.full((ns[i],), seqs[i].row, device=self.device) for i in fol])
        src_row = torch.cat([torch.full((ns[i],), seqs[src[i]].row, device=self.device) for i in fol])
        slot = lambda r: self.block_table[r, pos // bs] * bs + pos % bs  # noqa: E731
        dst, from_ = slot(dst_row), slot(src_row)
        self.cache.k[:, dst] = self.cache.k[:, from_]
        self.cache.v[:, dst] = self.cache.v[:, from_]
        self.stats["shared_prefill_tokens"] += int(pos.numel())

    # -- static-shape decode (CUDA graphs) -------------------------------------------------------

    def _decode_static(self, rows: torch.Tensor, pos: torch.Tensor, ctx_max: int) -> torch.Tensor:
        """Decode the token at ``pos`` [B] of each row, padded to a (batch, context) bucket.

        Padding rows compute a dummy token at position 0 whose K/V go to the scratch block and
        which attends to one scratch key. On CUDA each bucket is captured once as a CUDA graph and
        replayed; elsewhere the same padded forward runs eagerly (which is how the padding is
        tested on the CPU)."""
        B, bs = rows.numel(), self.cache.block_size
        Bb = 1 << (B - 1).bit_length()  # next power of two
        nb = min(1 << (-(-ctx_max // bs) - 1).bit_length(), self.max_blocks)
        st = self._static.get((Bb, nb))
        if st is None:
            st = self._static[(Bb, nb)] = _StaticDecode(self, Bb, nb)
        scratch = self.cache.scratch_block
        bt = torch.full((Bb, nb), scratch, dtype=torch.int64, device=self.device)
        bt[:B] = self.block_table[rows, :nb]
        p = torch.zeros(Bb, dtype=torch.int64, device=self.device)
        p[:B] = pos
        st.tokens.zero_()
        st.tokens[:B, 0] = self.tok_buf[rows, pos]
        st.positions.copy_(p[:, None])
        write = bt.gather(1, (p // bs)[:, None]) * bs + (p % bs)[:, None]  # [Bb, 1]
        write[B:] = scratch * bs
        st.write.copy_(write)
        st.read.copy_((bt[:, :, None] * bs + torch.arange(bs, device=self.device)).reshape(Bb, nb * bs))
        ctx = p + 1  # padding rows: one visible key (a scratch slot)
        st.mask.copy_((torch.arange(nb * bs, device=self.device)[None, :] < ctx[:, None])[:, None, None, :])
        st.table.copy_(bt)
        st.ctx.copy_(ctx)
        st.run()
        return st.logits[:B]

    def _finish(self, s: _Seq, reason: str, stop_str: str | None) -> Output:
        out = self._output(s, reason, stop_str)
        if reason == "tool":
            s.status = PAUSED
        else:
            del self.seqs[s.req.id]
            self._free(s)
        return out

    def _output(self, s: _Seq, reason: str, stop_str: str | None = None) -> Output:
        r, n = s.row, s.seq_len
        if r >= 0:
            tok, lp, gen, ver = self._row_state(r, n)
        elif s.saved is not None:
            tok, lp, gen, ver = s.saved
        else:  # never admitted
            tok, lp = torch.tensor(s.req.prompt), torch.zeros(n)
            gen, ver = torch.zeros(n, dtype=torch.bool), torch.full((n,), -1)
        return Output(id=s.req.id, tokens=tok.tolist(), prompt_len=len(s.req.prompt), logprobs=lp.tolist(),
                      generated=gen.tolist(), versions=ver.tolist(), finish_reason=reason, stop_string=stop_str)

    # -- stop strings ---------------------------------------------------------------------------

    def _trigger_ids(self, stop: str) -> frozenset[int]:
        """Token ids that can complete the stop string: their text holds its last character, or an
        incomplete UTF-8 sequence (a byte-level token may carry part of a multi-byte character)."""
        if stop not in self._triggers:
            texts = vocab_texts(self.tokenizer, min(self.model.args.vocab_size, self.tokenizer.vocab_size))
            last = stop[-1]
            self._triggers[stop] = frozenset(i for i, t in enumerate(texts) if last in t or "\ufffd" in t)
        return self._triggers[stop]

    def _stop_string(self, s: _Seq, token: int) -> str | None:
        """The stop string that the newest token completes, searched in this turn's generated text
        (decoded whole, so multi-byte characters split over tokens are matched), or None. Python
        lists only: no tensor is read per request."""
        for stop in s.req.params.stop_strings:
            if token in self._triggers[stop] and stop_completed(self.tokenizer, s.turn, stop):
                return stop
        return None


def run_to_completion(engine, requests: Iterable[Request]) -> list[Output]:
    """Submit ``requests`` to ``engine`` (an Engine or anything with its submit / step / has_work /
    release) and step until all finish; a tool pause ends its request. Outputs in submission order."""
    ids = []
    for r in requests:
        engine.submit(r)
        ids.append(r.id)
    done = {}
    while engine.has_work():
        for out in engine.step():
            done[out.id] = out
            if out.finish_reason == "tool":
                engine.release(out.id)
    return [done[i] for i in ids]


def stop_completed(tokenizer, ids: list[int], stop: str) -> bool:
    """Whether the text of ``ids`` contains ``stop`` and the text without the last id does not."""
    return stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])


_VOCAB_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocab_texts(tokenizer, n: int) -> list[str]:
    """The text of each of the first ``n`` token ids, decoded once per tokenizer (a real vocabulary
    is ~150k decode calls: once, not once per stop string and engine)."""
    texts = _VOCAB_TEXTS.get(tokenizer)
    if texts is None or len(texts) < n:
        texts = [tokenizer.decode([i]) for i in range(n)]
        try:
            _VOCAB_TEXTS[tokenizer] = texts
        except TypeError:  # not weak-referenceable: no cache
            pass
    return texts[:n]


class _StaticDecode:
    """Fixed-shape input/output buffers of one (batch, context) bucket, and its CUDA graph."""

    def __init__(self, engine: Engine, B: int, nb: int):
        dev, L = engine.device, nb * engine.cache.block_size
        self.engine = engine
        self.tokens = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.write = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.read = torch.zeros(B, L, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=dev)
        self.table = torch.full((B, nb), engine.cache.scratch_block, dtype=torch.int64, device=dev)  # the kernel's
        self.ctx = torch.ones(B, dtype=torch.int64, device=dev)
        self.logits = torch.zeros(B, engine.model.args.vocab_size, dtype=next(engine.model.parameters()).dtype,
                                  device=dev)
        self.graph = None
        if engine.use_graphs:
            self.write.fill_(engine.cache.scratch_block * engine.cache.block_size)
            self.read.fill_(engine.cache.scratch_block * engine.cache.block_size)
            self.mask[..., 0] = True
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and the allocator outside the capture
                    self._forward()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=engine._graph_pool):
                self._forward()

    def _forward(self) -> None:
        e = self.engine
        attn = PagedAttention(e.cache, self.write, self.read, self.mask, fresh=False, exact=e.exact,
                              block_table=self.table, ctx=self.ctx, kernel=e.paged_kernel, q_start=self.positions[:, 0])
        hidden = e.model.forward_hidden(self.tokens, self.positions, attn)  # [B, 1, D]
        self.logits.copy_(e.model.logits(hidden[:, -1]))

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward()
