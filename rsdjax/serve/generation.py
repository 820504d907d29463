"""From a scheduled engine request to OpenAI choices: text, stop strings, logprobs, usage.

A `Choice` is one engine request, submitted when it is made (so a full queue is refused before any
response starts); `Choice.pieces()` yields a `Piece` per generated token, which the completions and
chat endpoints turn into response bodies or SSE chunks. Whatever way a choice ends early (stop
string, client gone, error), its `finally` cancels the engine request, which frees the slot before
the next decode step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any, AsyncIterator

from rsdjax.infer.interface import PromptTooLongError, Request, SamplingParams, TokenEvent
from rsdjax.infer.text import StopStringMatcher
from rsdjax.serve.errors import APIError, bad_request, model_not_found, server_busy, unavailable
from rsdjax.serve.metrics import ServerMetrics
from rsdjax.serve.scheduler import EngineDeadError, QueueFullError, Scheduler
from rsdjax.tokenizer import Tokenizer


@dataclasses.dataclass
class Piece:
    """What one generated token adds to a choice."""

    text: str
    event: TokenEvent
    finish_reason: str | None = None


@dataclasses.dataclass
class GenContext:
    """Everything a request handler needs; one per server."""

    scheduler: Scheduler
    tokenizer: Tokenizer | None
    metrics: ServerMetrics
    max_context: int
    vocab_size: int | None
    request_timeout: float | None = None  # seconds from arrival to the last token; None = no limit
    max_tokens_default: int | None = None  # caps chat's default max_tokens (the context's remaining room)
    adapters: Any = None  # the engine's `AdapterPool` when it serves LoRA adapters by name
    # the checkpoint's generation_config.json sampling settings, for fields a request leaves unset
    sampling_defaults: dict = dataclasses.field(default_factory=dict)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_prompt(ctx: GenContext, ids: list[int], max_tokens: int, param: str) -> None:
    if not ids:
        raise bad_request(f"{param}: the prompt is empty", param)
    if len(ids) + max_tokens > ctx.max_context:
        raise bad_request(str(PromptTooLongError(len(ids), max_tokens, ctx.max_context)), "max_tokens")
    if ctx.vocab_size is not None:
        bad = next((t for t in ids if not 0 <= t < ctx.vocab_size), None)
        if bad is not None:
            raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {ctx.vocab_size})", param)


def token_text(ctx: GenContext, token_id: int) -> str:
    if ctx.tokenizer is None:
        return f"token_id:{token_id}"
    return ctx.tokenizer.decode([token_id], skip_special_tokens=False)


class Choice:
    """One engine request (one OpenAI choice), submitted at construction so refusals come before any response."""

    def __init__(self, ctx: GenContext, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None):
        self.ctx, self.prompt_ids, self.params, self.adapter = ctx, prompt_ids, params, adapter
        self.deadline = time.monotonic() + ctx.request_timeout if ctx.request_timeout else None
        self._adapter_index = 0
        if adapter is not None:  # pinned until this choice ends: an unload waits for it
            try:
                self._adapter_index = ctx.adapters.acquire(adapter)
            except KeyError as e:
                raise model_not_found(str(e)) from None
            ctx.metrics.adapter_request(adapter)
        try:
            self.job = ctx.scheduler.submit(Request(new_id("req"), prompt_ids, params, self._adapter_index))
        except (QueueFullError, EngineDeadError) as e:
            self._release()
            if isinstance(e, QueueFullError):
                raise server_busy(f"server busy: {e}; retry later") from None
            raise unavailable(str(e)) from None

    def _release(self) -> None:
        if self._adapter_index:
            index, self._adapter_index = self._adapter_index, 0
            self.ctx.adapters.release(index)

    def cancel(self) -> None:
        self.ctx.scheduler.cancel(self.job)  # idempotent; frees the slot before the next decode step
        self._release()

    async def _next(self):
        """The job's next item, or a 504 once the request's deadline has passed (its slot is then freed)."""
        if self.deadline is None:
            return await self.job.queue.get()
        try:
            return await asyncio.wait_for(self.job.queue.get(), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            raise APIError(504, f"the request ran past the server's request timeout of {self.ctx.request_timeout:g} s",
                           type="timeout_error", code="request_timeout") from None

    async def pieces(self) -> AsyncIterator[Piece]:
        """A Piece per generated token; raises APIError if the engine refuses or fails."""
        ctx, job = self.ctx, self.job
        # the CLI's text path (rsdjax.infer.generate), so both give the same text for the same request
        matcher = StopStringMatcher(ctx.tokenizer, self.params.stop, self.prompt_ids) if ctx.tokenizer else None
        finish = None
        try:
            while finish is None:
                item = await self._next()
                if isinstance(item, PromptTooLongError):
                    raise bad_request(str(item), "max_tokens")
                if isinstance(item, ValueError):
                    raise bad_request(str(item), "prompt")
                if isinstance(item, BaseException) and ctx.scheduler.dead is not None:
                    raise APIError(500, str(item), type="server_error", code="engine_error")
                if isinstance(item, BaseException):  # shutting down
                    raise unavailable(str(item))
                for event in item:
                    text, finish = matcher.feed(event.token_id, event.finish_reason) if matcher else (
                        "", event.finish_reason)
                    yield Piece(text, event, finish)
                    if finish is not None:
                        break
            ctx.metrics.finished(finish)
            if self.adapter is not None:
                ctx.metrics.adapter_tokens(self.adapter, job.generated)
            timings(ctx, job)
        finally:
            if finish is None:
                ctx.metrics.finished("abort")
            self.cancel()  # no-op if the engine finished it; else (stop string, client gone, error) free the slot


def start_choices(ctx: GenContext, prompts: list[list[int]], params: list[list[SamplingParams]],
                  adapter: str | None = None) -> list[Choice]:
    """Submit every choice of a request (params[i]: the n choices of prompt i, each with its own
    settings, e.g. its own grammar state), or none (a refusal cancels those already queued)."""
    choices: list[Choice] = []
    try:
        for ids, prompt_params in zip(prompts, params, strict=True):
            for p in prompt_params:
                choices.append(Choice(ctx, ids, p, adapter))
    except APIError:
        for c in choices:
            c.cancel()
        raise
    return choices


def timings(ctx: GenContext, job) -> None:
    now = time.perf_counter()
    ctx.metrics.e2e.observe(now - job.arrival)
    if job.first_token is not None and job.generated > 1:
        ctx.metrics.tpot.observe((now - job.first_token) / (job.generated - 1))


async def merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """Interleave the pieces of several choices as they come, tagged with the choice index."""
    if len(streams) == 1:
        async for piece in streams[0]:
            yield 0, piece
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for piece in stream:
                await queue.put((index, piece))
        except Exception as e:  # noqa: BLE001 -- re-raised in the consumer (cancellation is not caught)
            await queue.put((index, e))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_all(choices: list[Choice]) -> list[list[Piece]]:
    """Every piece of every choice; if one fails, the others are cancelled (not left waiting forever)."""
    async def collect(choice):
        return [piece async for piece in choice.pieces()]

    tasks = [asyncio.ensure_future(collect(c)) for c in choices]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


def completion_logprobs(ctx: GenContext, pieces: list[Piece], offset: int) -> dict:
    """OpenAI legacy-completions logprobs for `pieces`; `offset` = text length before them."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece in pieces:
        e = piece.event
        out["tokens"].append(token_text(ctx, e.token_id))
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({token_text(ctx, t): lp for t, lp in e.top_logprobs.items()}
                                   if e.top_logprobs else None)
        out["text_offset"].append(offset)
        offset += len(piece.text)
    return out


def echo_logprobs(ctx: GenContext, prompt_ids: list[int], scored: list, top_n: int) -> dict:
    """The prompt's part of legacy-completions logprobs (echo): OpenAI's shape, None for the first token,
    each top dict the top `top_n` plus the prompt token itself. `scored` is `TokenEvent.prompt_logprobs`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token_id, entry in zip(prompt_ids, scored):
        text = token_text(ctx, token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp, top, _ = entry
        kept = dict(list(top.items())[:top_n])
        kept.setdefault(token_id, lp)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({token_text(ctx, t): v for t, v in kept.items()})
    return out


def join_logprobs(first: dict, second: dict, offset: int) -> dict:
    """Two legacy-completions logprobs dicts end to end, `second`'s text offsets shifted by `offset`."""
    return {"tokens": first["tokens"] + second["tokens"],
            "token_logprobs": first["token_logprobs"] + second["token_logprobs"],
            "top_logprobs": first["top_logprobs"] + second["top_logprobs"],
            "text_offset": first["text_offset"] + [o + offset for o in second["text_offset"]]}


def vllm_prompt_logprobs(ctx: GenContext, prompt_ids: list[int], scored: list, top_n: int) -> list:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {"<id>": {logprob, rank, decoded_token}},
    the prompt token first, then the top ones by rank (1 = most likely)."""
    out: list = []
    for token_id, entry in zip(prompt_ids, scored):
        if entry is None:
            out.append(None)
            continue
        lp, top, rank = entry
        item = {str(token_id): {"logprob": lp, "rank": rank, "decoded_token": token_text(ctx, token_id)}}
        for r, (t, v) in enumerate(sorted(top.items(), key=lambda kv: -kv[1])[:top_n], start=1):
            item.setdefault(str(t), {"logprob": v, "rank": r, "decoded_token": token_text(ctx, t)})
        out.append(item)
    return out


def chat_logprobs(ctx: GenContext, pieces: list[Piece]) -> dict:
    def entry(token_id, logprob):
        s = token_text(ctx, token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(p.event.token_id, p.event.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in (p.event.top_logprobs or {}).items()]}
                        for p in pieces]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
