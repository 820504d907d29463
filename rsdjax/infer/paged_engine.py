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
`max_chunk` caps a prompt chunk's width; at 1 a prompt runs one token a step through the decode
program, so there is no prompt-chunk program to load (`rsdjax generate` does that for short prompts).

What the slot engine serves, served the same way: the same sampler with each row's grammar bitmask
(structured output; a guide advances only on tokens that are outputs, so a recomputed request
keeps its grammar state), prompt logprobs from every prompt chunk (such a request skips the prefix
cache until its first token, since cached positions were never scored), and per-request LoRA
adapters from the same `AdapterPool` (each row gathers its own A/B; cached pages are keyed by the
adapter that wrote them). Use from one thread.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from rsdjax.config import ConfigError
from rsdjax.infer import forward
from rsdjax.infer.adapters import AdapterPool
from rsdjax.infer.events import check_request, prompt_logprob_entries, token_event
from rsdjax.infer.interface import Prefix, Request, SamplingParams, TokenEvent
from rsdjax.infer.pages import PagePool
from rsdjax.infer.paged_attention import warmup_reaches
from rsdjax.infer.paged_schedule import PageScheduling, Seq
from rsdjax.infer.paged_forward import (StepBatch, compiled_steps, empty_pools, empty_seq_state, page_bytes,
                                        pages_for_budget)
from rsdjax.infer.sampling import SamplingArrays, fill_bitmasks, no_constraint, seed_pair
from rsdjax.infer.shapes import DEFAULT_MAX_CONTEXT, buckets
from rsdjax.parallel.mesh import make_mesh, mesh_shape_of

DEFAULT_KV_CACHE_GB = 1.0  # where the backend reports no free memory (XLA:CPU)
# the step budget, vLLM's max_num_batched_tokens for its CPU API server: prompts that arrive together
# (8 x 128 tokens) are prefilled in one step, before any of them decodes, instead of two per step while
# the first ones already stream (with 256: p99 inter-token latency 663 -> 120 ms at concurrency 8, output
# 73 -> 94 tok/s at 32; scripts/bench_serve_vllm.py). Each prompt still takes one chunk a step (MAX_CHUNK).
DEFAULT_STEP_TOKENS = 2048
MIN_ATTEND_TOKENS = 256
MIN_CHUNK = 16
# attended pages grow 4x from one compiled shape to the next (batch sizes and chunk lengths 2x): warm-up
# compiles every (rows, width, attend) pair, and with 2x attend steps that was ~45 shapes at 8 slots x 4096
# tokens; a step that attends up to 4x the pages it needs costs a wider gather, not a compile mid-stream.
# Chunks grow 2x: prefill is compute-bound (~10 ms/token for SmolLM2-135M on 2 CPU cores, flat from 128
# to 256 tokens: scripts/bench_serve_step.py), so a 128-token prompt in a 256 chunk cost twice its work,
# in its TTFT and in the inter-token latency of every stream decoding during that step
ATTEND_GROWTH = 4
CHUNK_GROWTH = 2
# the widest prompt chunk, whatever the step budget: at 128-256 tokens prefill already runs near the
# machine's matmul peak (2.1-2.2 ms/token on 2 cores, scripts/bench_serve_step.py), so a wider chunk
# gains nothing and only lengthens the step every decoding stream waits through. A larger budget
# admits more prompts per step (one chunk each), not longer chunks of one prompt.
MAX_CHUNK = 256


class PagedEngine(PageScheduling):
    def __init__(self, model, max_slots: int = 32, max_context: int | None = None,
                 eos_token_ids: list[int] | None = None, mesh=None, page_size: int = 16,
                 kv_cache_gb: float | None = None, kv_memory_fraction: float = 0.9, num_pages: int | None = None,
                 prefix_caching: bool = True, max_step_tokens: int = DEFAULT_STEP_TOKENS, max_loras: int = 0,
                 max_lora_rank: int = 16, max_chunk: int = MAX_CHUNK):
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
        if max_chunk < 1:
            raise ConfigError(f"max_chunk must be >= 1, got {max_chunk}")
        default_eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.eos_token_ids = [int(t) for t in (eos_token_ids if eos_token_ids is not None else default_eos)
                              if t is not None]
        self.mesh = mesh if mesh is not None else forward.model_mesh(model) or make_mesh({})
        data = mesh_shape_of(self.mesh).get("data", 1)
        if mesh_shape_of(self.mesh).get("stage", 1) > 1:
            raise ConfigError(f"the paged engine does not pipeline stages (stage={mesh_shape_of(self.mesh)['stage']}): "
                              "use the slot engine (--engine slots) or a mesh with stage=1")

        self.pages_per_seq = math.ceil(self.max_context / self.page_size)
        # never more than every slot at full context (+1 page so a full engine still has one to give)
        self.num_pages = int(num_pages or min(
            pages_for_budget(cfg, self.mesh, self.page_size, kv_cache_gb, kv_memory_fraction, DEFAULT_KV_CACHE_GB),
            self.max_slots * self.pages_per_seq + 1))
        if self.num_pages < 1:
            raise ConfigError(f"the KV cache budget holds no page of {self.page_size} tokens "
                              f"({page_bytes(cfg, self.page_size)} bytes each): raise --kv-cache-gb")
        # shapes: decode rows (a multiple of `data`, so rows split over it), attended pages, chunk lengths
        self.batch_sizes = tuple(sorted({max(data, b) for b in buckets(1, self.max_slots)}))
        self.attend_pages = buckets(max(1, min(self.pages_per_seq, MIN_ATTEND_TOKENS // self.page_size)),
                                    self.pages_per_seq, ATTEND_GROWTH)
        widest = min(int(max_chunk), max(MIN_CHUNK, min(self.max_step_tokens, MAX_CHUNK, self.max_context)))
        self.chunk_sizes = buckets(min(MIN_CHUNK, widest), widest, CHUNK_GROWTH)  # (1,): prompts run as decode rows

        self.weights = forward.serving_weights(model, self.mesh, forward.layout_for(self.max_slots))
        self._steps = compiled_steps(cfg, self.mesh, self.num_pages, self.page_size)
        self._pools = empty_pools(cfg, self.mesh, self.num_pages, self.page_size)
        self._state = jax.device_put(empty_seq_state(cfg, self.max_slots + 1), self._steps.replicated)
        self._compiled: set[tuple[int, int, int, bool]] = set()  # (rows, width, attend, on adapters) run so far
        self.pool = PagePool(self.num_pages, self.page_size, prefix_caching)
        self._seqs: list[Seq | None] = [None] * self.max_slots
        self._admitted = 0
        self.preemptions = 0
        self._rng = np.random.default_rng()
        # multi-LoRA: the slot engine's stacked adapter pool, one entry per batch row
        self.adapters = AdapterPool(cfg, self.mesh, max_loras, max_lora_rank) if max_loras else None

    @property
    def vocab_size(self) -> int:
        """Token ids the model knows (rows padded for the mesh excluded)."""
        return self.cfg.logical_vocab_size

    # ------------------------------------------------------------ the Engine protocol

    def check(self, request: Request) -> None:
        check_request(request, self.vocab_size, min(self.max_context, self.num_pages * self.page_size))
        if request.adapter and self.adapters is None:
            raise ValueError(f"request {request.id}: adapter entry {request.adapter}, but the engine has no "
                             "adapter pool (max_loras=0)")

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
        key = self.adapters.cache_key(r.adapter) if r.adapter else 0
        self._seqs[slot] = Seq(r, slot, self._admitted, [int(t) for t in r.prompt_ids], cache_key=key)

    def _arm(self, slot: int, r: Request) -> None:
        seed = r.params.seed if r.params.seed is not None else int(self._rng.integers(0, 2**63))
        seed = np.array(seed_pair(seed), np.uint32)
        mask = np.zeros(self.cfg.vocab_size, bool)
        mask[np.asarray(r.prompt_ids)] = True
        params = jax.tree.map(lambda a: a[0], SamplingArrays.from_params([r.params]))
        self._state = self._steps.arm((self._state.keys.shape[0],), self._state, np.int32(slot), seed, params, mask)

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
        events = self._run(decode, [1] * len(decode)) if decode else []
        for call in self._chunk_calls(chunks):
            events += self._run([seq for seq, _ in call], [n for _, n in call], chunk=True)
        return events

    # ------------------------------------------------------------ running a step

    def _run(self, seqs: list[Seq], lengths: list[int], chunk: bool = False) -> list[TokenEvent]:
        """One device call: row i runs `lengths[i]` tokens of seqs[i] from its `computed` position;
        `chunk`: prompt chunks (a chunk shape, unless a chunk is one token wide), else decode rows."""
        reach = max(s.computed + n for s, n in zip(seqs, lengths))
        on_adapters = self.adapters is not None and any(s.request.adapter for s in seqs)  # another program
        rows, width, attend = self._step_shape(len(seqs), max(lengths) if chunk else 1,
                                               math.ceil(reach / self.page_size), on_adapters)
        batch = self._empty_batch(rows, width, attend)
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            batch.tokens[i, :n] = s.tokens[s.computed:s.computed + n]
            batch.positions[i, :n] = np.arange(s.computed, s.computed + n)
            batch.block_tables[i, :len(s.pages)] = s.pages
            batch.last[i], batch.rows[i] = n - 1, s.slot
            batch.emit[i] = s.computed + n == len(s.tokens)
            scored = s.tokens[s.computed + 1:s.computed + n + 1]
            batch.targets[i, :len(scored)] = scored
        guides = [s.request.params.guide if batch.emit[i] else None for i, s in enumerate(seqs)]
        if any(guides):
            batch.bitmask = fill_bitmasks(guides + [None] * (rows - len(seqs)), self.cfg.vocab_size)
        want = any(s.request.params.logprobs is not None for s in seqs)
        scoring = width > 1 and any(s.scoring for s in seqs)
        lora = self._lora([s.request.adapter for s in seqs] + [0] * (rows - len(seqs)))
        self._pools, self._state, (sampled, logprobs, prompt) = self._steps.step(
            self.weights, self._pools, self._state, batch, lora, np.bool_(want), np.bool_(scoring))
        self._compiled.add((rows, width, attend, on_adapters))
        sampled = np.asarray(sampled)
        logprobs = tuple(np.asarray(a) for a in logprobs) if want else None
        if scoring:
            prompt = tuple(np.asarray(a) for a in prompt)
            for i, (s, n) in enumerate(zip(seqs, lengths)):
                if s.scoring:
                    s.scored.append(tuple(a[i, :n] for a in prompt))
        events = []
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            s.computed += n
            self._register_full_pages(s)
            if batch.emit[i]:
                s.tokens.append(int(sampled[i]))
                s.generated += 1
                events.append(self._event(s, int(sampled[i]), logprobs, i))
        return events

    def _empty_batch(self, rows: int, width: int, attend: int) -> StepBatch:
        """Every row padding (positions -1, the spare state row, no grammar) until filled in."""
        return StepBatch(np.zeros((rows, width), np.int32), np.full((rows, width), -1, np.int32),
                         np.zeros((rows, attend), np.int32), np.zeros(rows, np.int32),
                         np.full(rows, self.max_slots, np.int32), np.zeros(rows, bool),
                         no_constraint(rows, self.cfg.vocab_size), np.zeros((rows, width), np.int32))

    def _warmup_batch(self, rows: int, width: int, attend: int, reach: int) -> StepBatch:
        """A step that writes nothing (every page index past the pool: writes dropped, reads clamped) and
        whose first row reaches position `reach`, so attention runs the branch that position picks."""
        batch = self._empty_batch(rows, width, attend)
        batch.positions[0] = np.maximum(np.arange(reach - width + 1, reach + 1), -1)
        batch.block_tables[:] = self.num_pages
        return batch

    def _lora(self, adapters: list[int]):
        """The step's `lora` argument: None without an adapter pool or when every row is on the base."""
        return None if self.adapters is None else self.adapters.step_argument(adapters)

    def _event(self, s: Seq, token: int, logprobs, row: int) -> TokenEvent:
        event = token_event(s.request, s.slot, token, s.generated, self.eos_token_ids, logprobs, row)
        if s.generated == 1 and s.request.params.prompt_logprobs is not None:
            scored = tuple(np.concatenate([c[j] for c in s.scored])[None] for j in range(4))  # [1, prompt, ...]
            event.prompt_logprobs = prompt_logprob_entries(s.request.prompt_ids, s.request.params.prompt_logprobs,
                                                           scored, 0)
            s.scored = []
        s.done = event.finish_reason is not None
        return event

    # ------------------------------------------------------------ warm-up and figures

    def warmup(self, shapes: list[tuple[int, int, int]] | None = None) -> int:
        """Compile (and run once, writing nothing) every shape `generate` can use, or just `shapes`;
        returns how many. With the persistent compile cache (rsdjax/compile_cache.py) a restart loads
        them from disk."""
        self._arm(self.max_slots, Request("warmup", [0], SamplingParams(seed=0)))  # the spare row
        shapes = self.shapes() if shapes is None else shapes
        # with an adapter pool each shape has two variants: base rows only (no LoRA), and rows on adapters
        variants = [[0], [1]] if self.adapters is not None else [[0]]
        if self.adapters is None:  # the forward executables, loaded (or compiled) side by side first
            def prepare(batch: StepBatch) -> None:
                key = self._steps.forward_key(self.weights, batch, None)
                self._steps.forward.prepare(key, self.weights, self._pools, batch, None, np.bool_(False))

            with ThreadPoolExecutor(max(1, min(len(shapes), os.cpu_count() or 1, 4))) as pool:
                list(pool.map(prepare, [self._empty_batch(*shape) for shape in shapes]))
        for rows, width, attend in shapes:
            for entry in variants:
                self._compiled.add((rows, width, attend, entry == [1]))
                for reach in warmup_reaches(attend, self.page_size):
                    self._pools, self._state, _ = self._steps.step(
                        self.weights, self._pools, self._state, self._warmup_batch(rows, width, attend, reach),
                        self._lora(entry * rows), np.bool_(False), np.bool_(False))
        jax.block_until_ready(self._pools)
        return len(shapes) * len(variants)

    def stats(self) -> dict:
        q = self.pool.query_tokens
        return {"kv_cache_usage": self.pool.used / self.num_pages, "num_pages": self.num_pages,
                "pages_used": self.pool.used, "prefix_cache_queries": q, "prefix_cache_hits": self.pool.hit_tokens,
                "prefix_cache_hit_rate": self.pool.hit_tokens / q if q else 0.0, "preemptions": self.preemptions}


__all__ = ["PagedEngine"]
