"""The slot engine contract (JetStream style) that the server, `rsdjax generate` and a fake engine share.

An engine owns `max_slots` decode slots over one batched KV cache:
  prefill(request) -> Prefix        run the prompt (may be done while other slots decode)
  insert(prefix, slot)              place the prefilled request into a free slot
  generate() -> list[TokenEvent]    one decode step for every active slot
  free(slot)                        release a slot (finished, cancelled, or client gone)
Stop *strings* need text, so they are handled above the engine (see `StopStringMatcher` in
`rsdjax.infer.text`); the engine handles EOS, stop token ids and max_tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics: divide positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI semantics, on generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0 = only the chosen one)
    prompt_logprobs: int | None = None  # the same for every prompt token but the first (echo, lm-eval scoring)
    # structured output: an object with fill_bitmask(int32 row) and consume(token) (`rsdjax.infer.
    # structured.Guide`), one per request; the engine masks every sampled token with it (a complete
    # grammar allows only EOS, which ends the request as usual)
    guide: Any = None


@dataclasses.dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: int = 0  # multi-LoRA: the entry of the engine's adapter pool (0 = the base model)


@dataclasses.dataclass
class Prefix:
    """A prefilled request ready to be inserted: its first sampled token and engine-private state."""

    request: Request
    first_token: "TokenEvent"
    state: Any = None


@dataclasses.dataclass
class TokenEvent:
    request_id: str
    slot: int
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # None while running, "stop" (EOS / stop id) or "length"
    # first event only, when the request asked for prompt_logprobs: one entry per prompt token, None for
    # the first (nothing predicts it), else (logprob of that token, {top token id: logprob} with the
    # token itself among them, its rank: 1 + how many tokens are more likely)
    prompt_logprobs: list[tuple[float, dict[int, float], int] | None] | None = None


class PromptTooLongError(ValueError):
    """prompt tokens + max_tokens exceed the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_context: int):
        self.prompt_tokens, self.max_tokens, self.max_context = prompt_tokens, max_tokens, max_context
        super().__init__(f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                         f"{prompt_tokens + max_tokens} exceeds the context of {max_context} tokens")


@runtime_checkable
class Engine(Protocol):
    max_slots: int
    max_context: int
    eos_token_ids: list[int]

    def prefill(self, request: Request) -> Prefix: ...

    def insert(self, prefix: Prefix, slot: int) -> None: ...

    def generate(self) -> list[TokenEvent]: ...

    def free(self, slot: int) -> None: ...

    def free_slots(self) -> list[int]: ...
