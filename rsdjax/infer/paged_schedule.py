"""The paged engine's host half: which sequences a step runs, in which compiled shape, and where their
K/V go (pages, the prefix cache, preemption). `PagedEngine` (rsdjax/infer/paged_engine.py) is the
device half and the `Engine` protocol on top; this class holds no device arrays.

It expects of the engine: `pool` (a `PagePool`), `_seqs` (a `Seq` or None per slot), `page_size`,
`max_slots`, `max_context`, `batch_sizes`, `chunk_sizes`, `attend_pages`, `_compiled` (the shapes run
so far) and `preemptions`.
"""
from __future__ import annotations

import collections
import dataclasses
import math

from rsdjax.infer.interface import Request
from rsdjax.infer.pages import extend_hashes
from rsdjax.infer.shapes import bucket_for, buckets

# prompt chunks of one width that a step runs share a call, up to this many rows and this many (padded)
# tokens: a call streams the weights once, and at 64-128 tokens a row prefill is still well below the
# matmul peak (SmolLM2-135M f32, 2 cores, context 1,040: 1 x 64 tokens 166-191 ms, 4 x 64 438-541 ms)
MAX_CHUNK_ROWS = 4
MAX_CALL_TOKENS = 512


@dataclasses.dataclass(eq=False)
class Seq:
    """One request's sequence: its tokens so far and the pages that hold their K/V."""

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
    matched: bool = False  # its prompt was looked up in the prefix cache (once per admission or recompute)
    cached: int = 0  # tokens that lookup found
    cache_key: int = 0  # its adapter's (`AdapterPool.cache_key`): the root of its page hashes
    scored: list = dataclasses.field(default_factory=list)  # prompt logprob arrays, one tuple per chunk

    @property
    def scoring(self) -> bool:
        """Its prompt's logprobs are wanted and not yet delivered (they come with the first token)."""
        return self.request.params.prompt_logprobs is not None and self.generated == 0

    @property
    def decoding(self) -> bool:
        return self.computed == len(self.tokens) - 1 and self.generated > 0


class PageScheduling:
    """Step planning for `PagedEngine` (see the module docstring for what it expects of the engine)."""

    def _plan_chunks(self, prefilling: list[Seq], budget: int) -> list[tuple[Seq, int]]:
        """Prompt chunks for this step, oldest sequence first, within `budget` tokens and the free pages
        (a prompt waits for pages rather than preempting a running sequence). Only one prompt a step runs a
        chunk that does not finish it (vLLM's max_num_partial_prefills = 1): prompts that fit in a chunk
        all enter together, long ones one at a time, so a step never stacks several long prompts' chunks.
        A chunk runs padded to its compiled width, so a prompt whose rest fits that width takes it whole,
        even past the budget: the padding would cost the same, and the rest alone would cost a call."""
        plan, partial = [], False
        for seq in sorted(prefilling, key=lambda s: s.order):
            if budget < 1:
                break
            if not seq.matched:
                self._match_prefix(seq)
            left = len(seq.tokens) - seq.computed
            n = min(left, budget, self.chunk_sizes[-1])
            if left <= bucket_for(n, self.chunk_sizes):
                n = left
            if n < left:
                if partial:
                    if seq.computed == seq.cached:  # nothing of its own yet: look again when it runs, since the
                        self._unmatch(seq)  # prompt running now may be caching its prefix (vLLM does the same)
                    continue
                partial = True
            if not self._reserve(seq, seq.computed + n):
                n = len(seq.pages) * self.page_size - seq.computed  # what the pages it holds cover
            if n <= 0:
                break
            plan.append((seq, n))
            budget -= n
        return plan

    def _match_prefix(self, seq: Seq) -> None:
        seq.matched = True
        if seq.scoring:  # every prompt position must run to be scored
            return
        full = (len(seq.tokens) - 1) // self.page_size  # the last token is always computed (its logits)
        extend_hashes(seq.hashes, seq.tokens, self.page_size, full, seq.cache_key)
        seq.pages = self.pool.match(seq.hashes[:full])
        seq.computed = seq.cached = len(seq.pages) * self.page_size
        seq.registered = len(seq.pages)
        if seq.preemptions == 0:  # a recompute is not a new query
            self.pool.query_tokens += len(seq.tokens)
            self.pool.hit_tokens += seq.computed

    def _unmatch(self, seq: Seq) -> None:
        """Undo `_match_prefix` for a sequence that has run nothing yet (its pages stay cached)."""
        if seq.preemptions == 0 and not seq.scoring:
            self.pool.query_tokens -= len(seq.tokens)
            self.pool.hit_tokens -= seq.cached
        self._drop_pages(seq)

    def _drop_pages(self, seq: Seq) -> None:
        """Give the sequence's pages back (cached ones stay findable): it starts again from its first token."""
        self.pool.release(seq.pages)
        seq.pages, seq.computed, seq.cached, seq.registered, seq.matched = [], 0, 0, 0, False

    def _reserve(self, seq: Seq, length: int) -> bool:
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

    def _preempt(self, seq: Seq) -> None:
        self._drop_pages(seq)
        if seq.scoring:  # its recompute scores the prompt again
            seq.scored = []
        seq.preemptions += 1
        self.preemptions += 1

    def _register_full_pages(self, seq: Seq) -> None:
        full = seq.computed // self.page_size
        if full > seq.registered:
            extend_hashes(seq.hashes, seq.tokens, self.page_size, full, seq.cache_key)
            for j in range(seq.registered, full):
                self.pool.register(seq.pages[j], seq.hashes[j])
            seq.registered = full

    def chunk_rows(self, width: int) -> tuple[int, ...]:
        """The row counts a call of prompt chunks `width` tokens wide is compiled for; a token a row (prompts
        run through the decode program) uses the decode batch sizes."""
        if width == 1:
            return self.batch_sizes
        return buckets(1, min(MAX_CHUNK_ROWS, max(1, MAX_CALL_TOKENS // width), self.max_slots))

    def _chunk_calls(self, chunks: list[tuple[Seq, int]]) -> list[list[tuple[Seq, int]]]:
        """A step's prompt chunks grouped into device calls: chunks of one compiled width run as the rows of
        one call, up to the most rows that width has (`chunk_rows`). Each call streams the weights once,
        so four 40-token prefix-cache hits cost one pass instead of four (prefill at 64 tokens a row is
        far from the matmul peak), and their first tokens all come out of that one call."""
        by_width: dict[int, list[tuple[Seq, int]]] = {}
        for seq, n in chunks:
            by_width.setdefault(bucket_for(n, self.chunk_sizes), []).append((seq, n))
        calls = []
        for width, group in by_width.items():
            most = self.chunk_rows(width)[-1]
            calls += [group[i:i + most] for i in range(0, len(group), most)]
        return calls

    def _step_shape(self, rows: int, width: int, pages: int, on_adapters: bool) -> tuple[int, int, int]:
        """(rows, width, attended pages) for `rows` rows of up to `width` tokens (1: decode rows, or prompts
        run a token at a time) reaching `pages` pages: the smallest shape this engine has compiled that
        holds it, else the smallest that does. A compile costs seconds and a padded step milliseconds, so
        a generation whose rows finish one by one, or a short prompt after a long one, compiles nothing
        new; after `warmup` every shape is compiled and each step runs in the smallest that holds it.
        Decode rows never run in a prompt chunk's shape (a 16-token row for one token)."""
        need = (rows, width, pages)
        compiled = [s[:3] for s in self._compiled if s[3] == on_adapters and (s[1] > 1) == (width > 1)
                    and all(a >= b for a, b in zip(s, need))]
        if compiled:
            return min(compiled, key=lambda s: (s[0] * s[1], s[2]))
        width = bucket_for(width, self.chunk_sizes) if width > 1 else 1
        rows = bucket_for(rows, self.chunk_rows(width) if width > 1 else self.batch_sizes)
        return rows, width, bucket_for(pages, self.attend_pages)

    def shapes(self) -> list[tuple[int, int, int]]:
        """(rows, tokens per row, attended pages) of every step `generate` can run."""
        steps = [(b, 1) for b in self.batch_sizes] + [(r, c) for c in self.chunk_sizes if c > 1
                                                      for r in self.chunk_rows(c)]
        return [(rows, width, attend) for rows, width in steps for attend in self.attend_pages]

    def shapes_for(self, prompt_lengths, max_new_tokens: int) -> list[tuple[int, int, int]]:
        """The shapes a generation of these prompts reaches (what `rsdjax generate` compiles first): decode
        at its widest row count, and for the prompts' first chunks, grouped by width as a step groups them
        (`_chunk_calls`), the fewest shapes that hold every group, at each attended-page bucket up to its
        longest context. Every other step it runs fits in one of these and runs there (`_step_shape`);
        only a preempted sequence's recompute, a chunk longer than its prompt, may need one more."""
        lengths = list(prompt_lengths)
        rows = bucket_for(min(len(lengths), self.max_slots), self.batch_sizes)
        widths = collections.Counter(bucket_for(min(n, self.chunk_sizes[-1]), self.chunk_sizes) for n in lengths)
        chunks = {(bucket_for(min(k, self.chunk_rows(w)[-1]), self.chunk_rows(w)), w) for w, k in widths.items()}
        chunks = [c for c in chunks if not any(o != c and o[0] >= c[0] and o[1] >= c[1] for o in chunks)]
        reach = min(max(lengths) + max_new_tokens, self.max_context)
        last = bucket_for(math.ceil(reach / self.page_size), self.attend_pages)
        steps = [(rows, 1)] + sorted(chunks, key=lambda c: (c[1], c[0]))
        return list(dict.fromkeys((r, w, a) for r, w in steps for a in self.attend_pages if a <= last))
