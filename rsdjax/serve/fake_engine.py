"""A deterministic fake of the slot engine, so the server can be tested (and load-tested) without a model.

It is a tiny "language model" whose logits are a pseudo-random function of the whole context: the
same prompt always gives the same greedy continuation, whatever else shares the batch, so a server
that mixes up slots, drops tokens or reorders them is caught. It honours the same contract as
`rsdjax.infer.engine.SlotEngine` (see `rsdjax.infer.interface`): `PromptTooLongError` from
`prefill`, EOS / stop token ids / max_tokens, temperature / top-k / top-p / min-p, penalties,
per-request seeds, logprobs and prompt logprobs. Optional delays make a decode step cost time, like a real model
whose step cost barely depends on how many slots are busy, which is what continuous batching exploits.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from rsdjax.infer.interface import Prefix, PromptTooLongError, Request, SamplingParams, TokenEvent
from rsdjax.infer.sampling import fill_bitmasks, unpack_bitmask

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: a cheap, well-spread context hash
_MASK = (1 << 64) - 1


def _mix(h: int, token: int) -> int:
    h = ((h ^ (token + 1)) * _MIX) & _MASK
    return h ^ (h >> 29)


@dataclasses.dataclass
class _SlotState:
    request: Request
    context_hash: int
    prompt_counts: np.ndarray  # token -> count in the prompt (repetition penalty)
    output_counts: np.ndarray  # token -> count generated so far (presence/frequency penalties)
    rng: np.random.Generator
    generated: int = 0
    done: bool = False


class FakeEngine:
    """Implements the `Engine` protocol; use it from one thread, like the real engine."""

    def __init__(self, vocab_size: int = 512, max_slots: int = 8, max_context: int = 256,
                 eos_token_ids: list[int] | None = None, step_delay: float = 0.0,
                 prefill_delay_per_token: float = 0.0):
        if vocab_size < 2 or max_slots < 1 or max_context < 2:
            raise ValueError(f"FakeEngine: need vocab_size >= 2, max_slots >= 1, max_context >= 2, got "
                             f"{vocab_size}, {max_slots}, {max_context}")
        self.vocab_size, self.max_slots, self.max_context = vocab_size, max_slots, max_context
        self.eos_token_ids = list(eos_token_ids if eos_token_ids is not None else [1])
        self.step_delay, self.prefill_delay_per_token = step_delay, prefill_delay_per_token
        self._slots: list[_SlotState | None] = [None] * max_slots
        self.steps = 0  # decode steps run (the tests read it to see batching happen)

    # ------------------------------------------------------------ the model

    def _logits(self, context_hash: int) -> np.ndarray:
        return np.random.default_rng(context_hash).standard_normal(self.vocab_size).astype(np.float32) * 4.0

    def _sample(self, state: _SlotState) -> TokenEvent:
        p = state.request.params
        logits = self._logits(state.context_hash)
        if p.repetition_penalty != 1.0:  # HF semantics over prompt + output
            seen = (state.prompt_counts + state.output_counts) > 0
            logits = np.where(seen, np.where(logits > 0, logits / p.repetition_penalty,
                                             logits * p.repetition_penalty), logits)
        logits = (logits - p.presence_penalty * (state.output_counts > 0)
                  - p.frequency_penalty * state.output_counts)
        logprobs = logits - np.logaddexp.reduce(logits)
        if p.guide is not None:  # structured output: only what the grammar allows may be drawn
            allowed = unpack_bitmask(fill_bitmasks([p.guide], self.vocab_size), self.vocab_size)[0]
            logits = np.where(allowed, logits, -np.inf)
        if p.temperature == 0.0:
            token = int(np.argmax(logits))
        else:
            token = int(state.rng.choice(self.vocab_size, p=_filtered_probs(logits / p.temperature, p)))
        top = None
        if p.logprobs:
            best = np.argsort(-logprobs, kind="stable")[: p.logprobs]
            top = {int(i): float(logprobs[i]) for i in best}
        state.generated += 1
        state.output_counts[token] += 1
        state.context_hash = _mix(state.context_hash, token)
        finish = None
        if p.guide is not None:  # once its grammar is complete, the guide allows only EOS: that ends it
            p.guide.consume(token)
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            finish = "stop"
        elif state.generated >= p.max_tokens or len(state.request.prompt_ids) + state.generated >= self.max_context:
            finish = "length"
        state.done = finish is not None
        lp = float(logprobs[token]) if p.logprobs is not None else None
        return TokenEvent(state.request.id, -1, token, logprob=lp, top_logprobs=top, finish_reason=finish)

    # ------------------------------------------------------------ Engine protocol

    def check(self, request: Request) -> None:
        """Raise (ValueError subclasses) if the request cannot run: the request's fault, not the engine's."""
        ids, p = request.prompt_ids, request.params
        if not ids:
            raise ValueError(f"request {request.id}: empty prompt")
        if len(ids) + p.max_tokens > self.max_context:
            raise PromptTooLongError(len(ids), p.max_tokens, self.max_context)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {request.id}: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        if p.seed is not None and p.seed < 0:  # as the real engine's sampling.validate
            raise ValueError(f"request {request.id}: seed must be >= 0, got {p.seed}")

    def prefill(self, request: Request) -> Prefix:
        self.check(request)
        ids, p = request.prompt_ids, request.params
        if self.prefill_delay_per_token:
            time.sleep(self.prefill_delay_per_token * len(ids))
        h, scored = 0, [None]
        for i, t in enumerate(ids):
            if i and p.prompt_logprobs is not None:  # the raw distribution after ids[:i] scores ids[i]
                logits = self._logits(h).astype(np.float64)  # as `_sample` computes them (float64 after penalties)
                logprobs = logits - np.logaddexp.reduce(logits)
                top = {int(j): float(logprobs[j]) for j in np.argsort(-logprobs, kind="stable")[:p.prompt_logprobs]}
                top.setdefault(int(t), float(logprobs[t]))
                scored.append((float(logprobs[t]), top, 1 + int(np.sum(logprobs > logprobs[t]))))
            h = _mix(h, t)
        state = _SlotState(request, h, np.bincount(ids, minlength=self.vocab_size).astype(np.float32),
                           np.zeros(self.vocab_size, np.float32), np.random.default_rng(p.seed))
        first = self._sample(state)
        if p.prompt_logprobs is not None:
            first.prompt_logprobs = scored
        return Prefix(request, first, state)

    def insert(self, prefix: Prefix, slot: int) -> None:
        if self._slots[slot] is not None:
            raise ValueError(f"slot {slot} is busy")
        self._slots[slot] = prefix.state

    def generate(self) -> list[TokenEvent]:
        active = [(i, s) for i, s in enumerate(self._slots) if s is not None and not s.done]
        if not active:
            return []
        if self.step_delay:
            time.sleep(self.step_delay)
        self.steps += 1
        events = []
        for slot, state in active:
            event = self._sample(state)
            event.slot = slot
            events.append(event)
        return events

    def free(self, slot: int) -> None:
        self._slots[slot] = None

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    # ------------------------------------------------------------ a reference, outside any server

    def complete_alone(self, prompt_ids: list[int], params: SamplingParams) -> list[TokenEvent]:
        """The tokens this prompt gives when it runs alone (a fresh engine, one slot): what tests compare to."""
        alone = FakeEngine(self.vocab_size, 1, self.max_context, self.eos_token_ids)
        prefix = alone.prefill(Request("alone", list(prompt_ids), dataclasses.replace(params)))
        events = [prefix.first_token]
        if events[-1].finish_reason is None:
            alone.insert(prefix, 0)
            while events[-1].finish_reason is None:
                events += alone.generate()
        return events


def _filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Softmax after top-k, top-p and min-p filtering (vLLM order)."""
    logits = logits.astype(np.float64)
    if p.top_k and p.top_k > 0 and p.top_k < logits.size:
        kth = np.sort(logits)[-p.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = np.zeros_like(probs, bool)
        keep[order[: int(np.searchsorted(cumulative, p.top_p)) + 1]] = True
        probs = np.where(keep, probs, 0.0)
    if p.min_p > 0.0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()
