"""`generate`: run a list of prompts to completion through an engine's slots.

This is the batch path behind `rsdjax generate` and `scripts/infer.py` (the server has its own
scheduler over the same `Engine` protocol). Prompts beyond the number of slots wait and join the
running batch as slots free up; prompts admitted together are prefilled in one pass when the
engine offers `prefill_many`.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

from rsdjax.infer.interface import Engine, Request, SamplingParams, TokenEvent
from rsdjax.infer.text import StopStringMatcher


@dataclasses.dataclass
class Completion:
    index: int
    prompt_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str | None = None  # None without a tokenizer
    finish_reason: str | None = None  # "stop" (EOS, stop id or stop string) or "length"
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    ttft_s: float | None = None  # from the call's start to this prompt's first token
    done_s: float | None = None  # from the call's start to its last token

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second of decoding."""
        if self.done_s is None or self.ttft_s is None or len(self.token_ids) < 2 or self.done_s <= self.ttft_s:
            return None
        return (len(self.token_ids) - 1) / (self.done_s - self.ttft_s)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        if out["top_logprobs"] is not None:
            out["top_logprobs"] = [{str(k): v for k, v in d.items()} for d in out["top_logprobs"]]
        return out


def checked_requests(engine, prompts, params, tokenizer=None) -> list[Request]:
    """The engine requests for `prompts` (`gen-0`, `gen-1`, ...), each checked: raises ValueError
    naming the first bad one (callers check before compiling anything)."""
    params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(params_list)} SamplingParams")
    requests = [Request(f"gen-{i}", [int(t) for t in ids], p) for i, (ids, p) in enumerate(zip(prompts, params_list))]
    for r in requests:
        if r.params.stop and tokenizer is None:
            raise ValueError(f"{r.id}: stop strings need a tokenizer (the model has no tokenizer.json)")
        check = getattr(engine, "check", None)
        if check is not None:
            check(r)
    return requests


def generate(engine: Engine, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             tokenizer=None, on_text: Callable[[int, str], None] | None = None,
             on_token: Callable[[int, TokenEvent], None] | None = None) -> list[Completion]:
    """Complete every prompt (token ids). `params` is one SamplingParams for all or one per prompt.

    With a tokenizer, text is detokenised incrementally and stop strings end a completion;
    `on_text(index, piece)` receives text as it becomes final (for streaming to a terminal).
    A stop token (EOS or a stop id) ends a completion without adding text, as in vLLM.
    Every request is checked before any runs, so a bad one fails the call without wasted work.
    """
    requests = checked_requests(engine, prompts, params, tokenizer)

    start = time.perf_counter()
    completions = [Completion(i, r.prompt_ids, text="" if tokenizer else None,
                              logprobs=[] if r.params.logprobs is not None else None,
                              top_logprobs=[] if r.params.logprobs else None) for i, r in enumerate(requests)]
    matchers = [StopStringMatcher(tokenizer, r.params.stop, r.prompt_ids) if tokenizer else None for r in requests]

    def deliver(i: int, event: TokenEvent) -> bool:
        """Record one token of completion i; True when the completion is finished."""
        c, matcher = completions[i], matchers[i]
        now = time.perf_counter() - start
        c.ttft_s = now if c.ttft_s is None else c.ttft_s
        c.token_ids.append(event.token_id)
        if c.logprobs is not None:
            c.logprobs.append(event.logprob)
        if c.top_logprobs is not None:
            c.top_logprobs.append(event.top_logprobs or {})
        finish = event.finish_reason
        if matcher is not None:
            piece, finish = matcher.feed(event.token_id, finish)
            c.text += piece
            if piece and on_text is not None:
                on_text(i, piece)
        if on_token is not None:
            on_token(i, event)
        if finish is not None:
            c.finish_reason, c.done_s = finish, now
        return finish is not None

    waiting = collections.deque(range(len(requests)))
    running: dict[int, int] = {}  # slot -> completion index
    while waiting or running:
        free = engine.free_slots()
        if waiting and free:
            batch = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
            prefill_many = getattr(engine, "prefill_many", None)
            prefixes = (prefill_many([requests[i] for i in batch]) if prefill_many is not None
                        else [engine.prefill(requests[i]) for i in batch])
            for i, prefix in zip(batch, prefixes):
                if not deliver(i, prefix.first_token):
                    slot = free.pop(0)
                    engine.insert(prefix, slot)
                    running[slot] = i
        if running:
            for event in engine.generate():
                if deliver(running[event.slot], event):
                    engine.free(event.slot)
                    del running[event.slot]
    return completions
