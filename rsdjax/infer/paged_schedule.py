"""The paged engine's host half: which sequences a step runs, in which compiled shape, and where their
K/V go (pages, the prefix cache, preemption). `PagedEngine` (rsdjax/infer/paged_engine.py) is the
device half and the `Engine` protocol on top; this class holds no device arrays.

It expects of the engine: `pool` (a `PagePool`), `_seqs` (a `Seq` or None per slot), `page_size`,
`batch_sizes`, `chunk_sizes`, `attend_pages`, `_compiled` (the shapes run so far) and `preemptions`.
"""
from __future__ import annotations

import dataclasses
import math

from rsdjax.infer.interface import Request
from rsdjax.infer.pages import extend_hashes
from rsdjax.infer.shapes import bucket_for


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
        seq.computed, seq.registered = len(seq.pages) * self.page_size, len(seq.pages)
        if seq.preemptions == 0:  # a recompute is not a new query
            self.pool.query_tokens += len(seq.tokens)
            self.pool.hit_tokens += seq.computed

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
        self.pool.release(seq.pages)
        seq.pages, seq.computed, seq.registered, seq.matched = [], 0, 0, False
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

    def _step_shape(self, rows: int, chunk: int, pages: int, on_adapters: bool) -> tuple[int, int, int]:
        """(rows, width, attended pages) for `rows` decode rows (`chunk` 0) or one prompt chunk of `chunk`
        tokens, reaching `pages` pages: the smallest shape this engine has compiled that holds it, else
        the smallest that does. A compile costs seconds and a padded step milliseconds, so a generation
        whose rows finish one by one, or a short prompt after a long one, compiles nothing new; after
        `warmup` every shape is compiled and each step runs in the smallest that holds it."""
        need = (1, chunk, pages) if chunk else (rows, 1, pages)
        compiled = [s[:3] for s in self._compiled if s[3] == on_adapters and (s[1] > 1) == bool(chunk)
                    and all(a >= b for a, b in zip(s, need))]
        if compiled:
            return min(compiled, key=lambda s: (s[0] * s[1], s[2]))
        width = bucket_for(chunk, self.chunk_sizes) if chunk else 1
        return (1 if chunk else bucket_for(rows, self.batch_sizes)), width, bucket_for(pages, self.attend_pages)
