"""`PagedEngine`: continuous batching over a paged KV cache (the `Engine` protocol, vLLM-style inside).

    prefill(request)  check it; the prompt is run later, in chunks, by generate() (first_token None)
    insert(prefix, s) give the request slot s (a sequence handle) and arm its sampling state
    generate()        one engine step: a token for every decoding sequence, then prompt chunks
                      under the step's token budget; events for tokens that are outputs
    free(s)           release the sequence's pages (cached ones stay findable) and the slot

Memory: one pool of pages (`page_size` positions each, every layer) sized by a byte budget, not
by slots x context; a sequence takes pages as it grows. Prefix caching: a new sequence starts
from the pages of its longest cached prefix (`rsdjax.infer.pages`). When a page is needed and
none is left, the newest sequence holding pages is preempted: its pages go back, it keeps its slot
and its sampling state, and it is recomputed from its tokens later (prompt + what it generated),
so its output is the same and no request is lost. Decode rows are padded to the smallest compiled
batch size that holds them, so a step costs what is running; `warmup()` compiles every shape.
Use from one thread.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from rsdjax.config import ConfigError
from rsdjax.infer import forward
from rsdjax.infer.events import token_event
from rsdjax.infer.interface import Prefix, PromptTooLongError, Request, SamplingParams, TokenEvent
from rsdjax.infer.pages import PagePool, extend_hashes
from rsdjax.infer.paged_forward import compiled_steps, empty_pools, empty_seq_state, page_bytes
from rsdjax.infer.sampling import SamplingArrays, keys_from_seeds, seed_pair, validate
from rsdjax.infer.shapes import DEFAULT_MAX_CONTEXT, bucket_for, buckets
from rsdjax.parallel.mesh import make_mesh, mesh_shape_of

DEFAULT_KV_CACHE_GB = 1.0  # where the backend reports no free memory (XLA:CPU)
MIN_ATTEND_TOKENS = 256
MIN_CHUNK = 16


@dataclasses.dataclass(eq=False)
class _Seq:
    request: Request
    slot: int
    order: int  # admission order: the newest is preempted first
    tokens: list[int]  # prompt, then every sampled token
    pages: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # keys of its full pages so far
    computed: int = 0  # tokens whose K/V are in `pages`
    registered: int = 0  # full pages offered to the prefix cache
    generated: int = 0
    done: bool = False
    preemptions: int = 0

    @property
    def decoding(self) -> bool:
        return self.computed == len(self.tokens) - 1 and self.generated > 0


class PagedEngine:
    def __init__(self, model, max_slots: int = 32, max_context: int | None = None,
                 eos_token_ids: list[int] | None = None, mesh=None, page_size: int = 16,
                 kv_cache_gb: float | None = None, kv_memory_fraction: float = 0.9, num_pages: int | None = None,
                 prefix_caching: bool = True, max_step_tokens: int = 256):
        cfg = self.cfg = model.cfg
        self.max_slots = int(max_slots)
        self.max_context = int(max_context or min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT))
        self.page_size, self.max_step_tokens = int(page_size), int(max_step_tokens)
        if self.max_slots < 1:
            raise ConfigError(f"max_slots must be >= 1, got {max_slots}")
        if not 2 <= self.max_context <= cfg.max_position_embeddings:
            raise ConfigError(f"max_context must be in [2, {cfg.max_position_embeddings}] (the model's "
                              f"max_position_embeddings), got {self.max_context}")
        if not 1 <= self.page_size <= 1024:
            raise ConfigError(f"page_size must be in [1, 1024] (16-128 is usual), got {page_size}")
        if self.max_step_tokens < MIN_CHUNK:
            raise ConfigError(f"max_step_tokens must be >= {MIN_CHUNK}, got {max_step_tokens}")
        default_eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.eos_token_ids = [int(t) for t in (eos_token_ids if eos_token_ids is not None else default_eos)
                              if t is not None]
        self.mesh = mesh if mesh is not None else forward.model_mesh(model) or make_mesh({})
        data = mesh_shape_of(self.mesh).get("data", 1)

        self.pages_per_seq = math.ceil(self.max_context / self.page_size)
        self.num_pages = int(num_pages or self._pages_for_budget(kv_cache_gb, kv_memory_fraction))
        if self.num_pages < 1:
            raise ConfigError(f"the KV cache budget holds no page of {self.page_size} tokens "
                              f"({page_bytes(cfg, self.page_size)} bytes each): raise --kv-cache-gb")
        # shapes: decode rows (a multiple of `data`, so rows split over it), attended pages, chunk lengths
        self.batch_sizes = tuple(sorted({max(data, b) for b in buckets(1, self.max_slots)}))
        self.attend_pages = buckets(max(1, min(self.pages_per_seq, MIN_ATTEND_TOKENS // self.page_size)),
                                    self.pages_per_seq)
        self.chunk_sizes = buckets(MIN_CHUNK, max(MIN_CHUNK, min(self.max_step_tokens, self.max_context)))

        self.weights = forward.serving_weights(model, self.mesh)
        self._steps = compiled_steps(cfg, self.mesh, self.num_pages, self.page_size)
        self._pools = empty_pools(cfg, self.mesh, self.num_pages, self.page_size)
        self._state = jax.device_put(empty_seq_state(cfg, self.max_slots + 1), self._steps.replicated)
        self.pool = PagePool(self.num_pages, self.page_size, prefix_caching)
        self._seqs: list[_Seq | None] = [None] * self.max_slots
        self._admitted = 0
        self.preemptions = 0
        self._rng = np.random.default_rng()

    def _pages_for_budget(self, kv_cache_gb, fraction) -> int:
        per_device = page_bytes(self.cfg, self.page_size)
        spec = self._pool_spec_shards()
        per_device //= spec
        if kv_cache_gb is None:
            stats = jax.local_devices()[0].memory_stats() or {}
            free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
            budget = free * fraction if free > 0 else DEFAULT_KV_CACHE_GB * 2**30
        else:
            budget = float(kv_cache_gb) * 2**30
        # never more than every slot at full context (+1 page so a full engine still has one to give)
        return min(int(budget // per_device), self.max_slots * self.pages_per_seq + 1)

    def _pool_spec_shards(self) -> int:
        from rsdjax.infer.paged_forward import pool_sharding

        sharding = pool_sharding(self.cfg, self.mesh, 1, self.page_size)
        shape = mesh_shape_of(self.mesh)
        return math.prod(shape[a] for entry in sharding.spec if entry
                         for a in ((entry,) if isinstance(entry, str) else entry))

    # ------------------------------------------------------------ the Engine protocol

    def check(self, request: Request) -> None:
        ids, p = request.prompt_ids, request.params
        where = f"request {request.id}"
        if not ids:
            raise ValueError(f"{where}: empty prompt")
        bad = [t for t in ids if not 0 <= int(t) < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"{where}: token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})")
        validate(p, self.cfg.vocab_size, where)
        missing = [name for name, asked in (("structured output", p.guide is not None),
                                            ("prompt_logprobs", p.prompt_logprobs is not None),
                                            ("per-request LoRA adapters", request.adapter != 0)) if asked]
        if missing:  # refused rather than silently ignored
            raise ValueError(f"{where}: the paged engine does not serve {', '.join(missing)} yet (use --engine slots)")
        limit = min(self.max_context, self.num_pages * self.page_size)
        if len(ids) + p.max_tokens > limit:
            raise PromptTooLongError(len(ids), p.max_tokens, limit)

    def prefill(self, request: Request) -> Prefix:
        self.check(request)
        return Prefix(request, None)

    def insert(self, prefix: Prefix, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} does not exist (max_slots={self.max_slots})")
        if self._seqs[slot] is not None:
            raise ValueError(f"slot {slot} is busy")
        r = prefix.request
        self._arm(slot, r)
        self._admitted += 1
        self._seqs[slot] = _Seq(r, slot, self._admitted, [int(t) for t in r.prompt_ids])

    def _arm(self, slot: int, r: Request) -> None:
        seed = r.params.seed if r.params.seed is not None else int(self._rng.integers(0, 2**63))
        key = keys_from_seeds(np.array([seed_pair(seed)], np.uint32))[0]
        mask = np.zeros(self.cfg.vocab_size, bool)
        mask[np.asarray(r.prompt_ids)] = True
        params = jax.tree.map(lambda a: a[0], SamplingArrays.from_params([r.params]))
        self._state = self._steps.arm(self._state, np.int32(slot), key, params, mask)

    def free(self, slot: int) -> None:
        seq = self._seqs[slot]
        if seq is not None:
            self.pool.release(seq.pages)
            self._seqs[slot] = None

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._seqs) if s is None]

    def generate(self) -> list[TokenEvent]:
        decode = sorted((s for s in self._seqs if s is not None and not s.done and s.decoding), key=lambda s: s.order)
        for seq in decode:
            if seq.decoding:  # not preempted by an older one's reservation
                self._reserve(seq, seq.computed + 1)
        decode = [s for s in decode if s.decoding]
        prefilling = [s for s in self._seqs if s is not None and not s.done and not s.decoding]
        chunks = self._plan_chunks(prefilling, self.max_step_tokens - len(decode))
        events = []
        if decode:
            events += self._run(decode, [1] * len(decode))
        for seq, n in chunks:
            events += self._run([seq], [n])
        return events

    # ------------------------------------------------------------ scheduling

    def _plan_chunks(self, prefilling: list[_Seq], budget: int) -> list[tuple[_Seq, int]]:
        """Prompt chunks for this step, oldest sequence first, within `budget` tokens and the free pages
        (a prompt waits for pages rather than preempting a running sequence)."""
        plan = []
        for seq in sorted(prefilling, key=lambda s: s.order):
            if budget < 1:
                break
            if seq.computed == 0 and not seq.pages:
                self._match_prefix(seq)
            n = min(len(seq.tokens) - seq.computed, budget, self.chunk_sizes[-1])
            if not self._reserve(seq, seq.computed + n):
                n = len(seq.pages) * self.page_size - seq.computed  # what the pages it holds cover
            if n <= 0:
                break
            plan.append((seq, n))
            budget -= n
        return plan

    def _match_prefix(self, seq: _Seq) -> None:
        full = (len(seq.tokens) - 1) // self.page_size  # the last token is always computed (its logits)
        extend_hashes(seq.hashes, seq.tokens, self.page_size, full)
        seq.pages = self.pool.match(seq.hashes[:full])
        seq.computed, seq.registered = len(seq.pages) * self.page_size, len(seq.pages)
        if seq.preemptions == 0:  # a recompute is not a new query
            self.pool.query_tokens += len(seq.tokens)
            self.pool.hit_tokens += seq.computed

    def _reserve(self, seq: _Seq, length: int) -> bool:
        """Pages for `length` tokens of `seq`. When none are left, sequences newer than `seq` are
        preempted, newest first (older requests have priority, as in vLLM); a decoding `seq` that is
        itself the newest preempts itself. False if `seq` did not get them all."""
        need = math.ceil(length / self.page_size)
        while len(seq.pages) < need:
            page = self.pool.allocate()
            if page is None:
                victim = max((s for s in self._seqs if s is not None and s.pages), key=lambda s: s.order)
                if victim.order > seq.order:
                    self._preempt(victim)
                    continue
                if victim is seq and seq.decoding:
                    self._preempt(seq)
                return False
            seq.pages.append(page)
        return True

    def _preempt(self, seq: _Seq) -> None:
        self.pool.release(seq.pages)
        seq.pages, seq.computed, seq.registered = [], 0, 0
        seq.preemptions += 1
        self.preemptions += 1

    # ------------------------------------------------------------ running a step

    def _run(self, seqs: list[_Seq], lengths: list[int]) -> list[TokenEvent]:
        """One device call: row i runs `lengths[i]` tokens of seqs[i] from its `computed` position."""
        rows = bucket_for(len(seqs), self.batch_sizes) if max(lengths) == 1 else 1
        width = 1 if max(lengths) == 1 else bucket_for(max(lengths), self.chunk_sizes)
        reach = max(s.computed + n for s, n in zip(seqs, lengths))
        attend = bucket_for(math.ceil(reach / self.page_size), self.attend_pages)
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        tables = np.zeros((rows, attend), np.int32)
        last = np.zeros(rows, np.int32)
        slot_rows = np.full(rows, self.max_slots, np.int32)  # padding rows use the spare state row
        emit = np.zeros(rows, bool)
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            tokens[i, :n] = s.tokens[s.computed:s.computed + n]
            positions[i, :n] = np.arange(s.computed, s.computed + n)
            tables[i, :len(s.pages)] = s.pages
            last[i], slot_rows[i] = n - 1, s.slot
            emit[i] = s.computed + n == len(s.tokens)
        want = any(s.request.params.logprobs is not None for s in seqs)
        self._pools, self._state, (sampled, logprobs) = self._steps.step(
            self.weights, self._pools, self._state, tokens, positions, tables, last, slot_rows, emit, np.bool_(want))
        sampled = np.asarray(sampled)
        logprobs = tuple(np.asarray(a) for a in logprobs) if want else None
        events = []
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            s.computed += n
            self._register_full_pages(s)
            if emit[i]:
                s.tokens.append(int(sampled[i]))
                s.generated += 1
                events.append(self._event(s, int(sampled[i]), logprobs, i))
        return events

    def _register_full_pages(self, seq: _Seq) -> None:
        full = seq.computed // self.page_size
        if full > seq.registered:
            extend_hashes(seq.hashes, seq.tokens, self.page_size, full)
            for j in range(seq.registered, full):
                self.pool.register(seq.pages[j], seq.hashes[j])
            seq.registered = full

    def _event(self, s: _Seq, token: int, logprobs, row: int) -> TokenEvent:
        event = token_event(s.request, s.slot, token, s.generated, self.eos_token_ids, logprobs, row)
        s.done = event.finish_reason is not None
        return event

    # ------------------------------------------------------------ warm-up and figures

    def warmup(self) -> int:
        """Compile (and run once, writing nothing) every shape `generate` can use; returns how many.
        With the persistent compile cache (rsdjax/compile_cache.py) a restart loads them from disk."""
        self._arm(self.max_slots, Request("warmup", [0], SamplingParams(seed=0)))  # the spare row
        shapes = [(b, 1) for b in self.batch_sizes] + [(1, c) for c in self.chunk_sizes]
        for rows, width in shapes:
            for attend in self.attend_pages:
                self._pools, self._state, _ = self._steps.step(
                    self.weights, self._pools, self._state, np.zeros((rows, width), np.int32),
                    np.full((rows, width), -1, np.int32), np.zeros((rows, attend), np.int32),
                    np.zeros(rows, np.int32), np.full(rows, self.max_slots, np.int32), np.zeros(rows, bool), np.bool_(False))
        jax.block_until_ready(self._pools)
        return len(shapes) * len(self.attend_pages)

    def stats(self) -> dict:
        q = self.pool.query_tokens
        return {"kv_cache_usage": self.pool.used / self.num_pages, "num_pages": self.num_pages,
                "pages_used": self.pool.used, "prefix_cache_queries": q, "prefix_cache_hits": self.pool.hit_tokens,
                "prefix_cache_hit_rate": self.pool.hit_tokens / q if q else 0.0, "preemptions": self.preemptions}


__all__ = ["PagedEngine"]
