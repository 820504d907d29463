"""`/v1/completions` and `/v1/chat/completions`: request -> choices -> JSON body or SSE stream.

Streaming waits for the first token before sending headers, so that a refusal or an engine failure
before any output is still a proper HTTP status (and a router can retry it elsewhere); after that,
one SSE chunk per generated token, an optional usage chunk, then `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from rsdjax.serve import generation as g
from rsdjax.serve.asgi import wait_or_disconnect
from rsdjax.serve.constraints import guides_for
from rsdjax.serve.errors import APIError, bad_request
from rsdjax.serve.protocol import ChatCompletionRequest, CompletionRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


def _encode_prompts(ctx: g.GenContext, body: CompletionRequest) -> list[list[int]]:
    prompts = []
    for p in body.prompts():
        if isinstance(p, str):
            if ctx.tokenizer is None:
                raise bad_request("prompt: this server has no tokenizer; send the prompt as token ids", "prompt")
            p = ctx.tokenizer.encode(p, add_bos=ctx.tokenizer.add_bos)
        prompts.append(p)
    return prompts


def _chat_prompt(ctx: g.GenContext, body: ChatCompletionRequest) -> list[int]:
    if ctx.tokenizer is None:
        raise bad_request("messages: this server has no tokenizer, so it cannot serve chat", "messages")
    try:
        return ctx.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
    except ValueError as e:
        raise bad_request(f"messages: {e}", "messages") from None


async def _respond(request: Request, choices: list[g.Choice], stream: bool,
                   body_fn: Callable[[list[list[g.Piece]]], dict],
                   chunks_fn: Callable[[int, g.Piece], list[dict]], tail_fn: Callable[[], list[dict]]):
    """The part common to both endpoints: collect or stream the choices, cancelling them on any exit."""
    if not stream:
        try:
            return JSONResponse(body_fn(await wait_or_disconnect(request, g.collect_all(choices))))
        finally:
            for c in choices:
                c.cancel()
    pieces = g.merged([c.pieces() for c in choices])
    try:
        first = await wait_or_disconnect(request, anext(pieces))
    except BaseException:
        for c in choices:
            c.cancel()
        raise

    async def sse() -> AsyncIterator[str]:
        try:
            for chunk in chunks_fn(*first):
                yield f"data: {json.dumps(chunk)}\n\n"
            async for index, piece in pieces:
                for chunk in chunks_fn(index, piece):
                    yield f"data: {json.dumps(chunk)}\n\n"
            for chunk in tail_fn():
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:  # the engine failed mid-stream: tell the client in-band
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            for c in choices:
                c.cancel()  # client gone (Starlette cancels us) or finished: free any slot still held
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _prompt_texts(ctx: g.GenContext, body: CompletionRequest, prompts: list[list[int]]) -> list[str]:
    """What `echo` puts before the completion: the prompt as sent, or token-id prompts decoded."""
    return [p if isinstance(p, str) else "".join(g.token_text(ctx, t) for t in ids) if ctx.tokenizer is None
            else ctx.tokenizer.decode(ids, skip_special_tokens=False) for p, ids in zip(body.prompts(), prompts)]


async def create_completion(ctx: g.GenContext, model: str, body: CompletionRequest, request: Request,
                            adapter: str | None = None):
    prompts = await asyncio.to_thread(_encode_prompts, ctx, body)  # off the event loop
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not (body.echo or body.prompt_logprobs is not None):
        raise bad_request("max_tokens: 0 generates nothing; it is only allowed with echo or prompt_logprobs "
                          "(to score the prompt)", "max_tokens")
    # scoring only (max_tokens 0): the engine still samples one token, which the response leaves out
    engine_max_tokens = max(max_tokens, 1)
    for ids in prompts:
        g.check_prompt(ctx, ids, engine_max_tokens, "prompt")
    echo_top = body.logprobs if body.echo else None
    wanted = [k for k in (echo_top, body.prompt_logprobs) if k is not None]
    prompt_k = max(wanted) if wanted else None
    guides = await guides_for(ctx, body, len(prompts) * body.n)
    params = [[body.sampling_params(engine_max_tokens, body.logprobs, j, prompt_k, guides[i * body.n + j],
                                       ctx.sampling_defaults)
               for j in range(body.n)] for i in range(len(prompts))]
    choices = g.start_choices(ctx, prompts, params, adapter)
    rid, created = g.new_id("cmpl"), int(time.time())
    prompt_tokens = sum(len(ids) for ids in prompts)
    prompt_of = [prompts[i // body.n] for i in range(len(choices))]  # choices go n per prompt
    echo_text = [_prompt_texts(ctx, body, prompts)[i // body.n] for i in range(len(choices))] if body.echo else None
    completion_tokens = [0] * len(choices)
    text_offset = [0] * len(choices)
    started = [False] * len(choices)
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}

    def prompt_part(i: int, first: g.Piece) -> tuple[str, dict | None, dict]:
        """The echoed text, its logprobs, and the vLLM prompt_logprobs field for choice i."""
        scored = first.event.prompt_logprobs
        extra = {}
        if body.prompt_logprobs is not None:
            extra["prompt_logprobs"] = g.vllm_prompt_logprobs(ctx, prompt_of[i], scored, body.prompt_logprobs)
        if not body.echo:
            return "", None, extra
        lp = g.echo_logprobs(ctx, prompt_of[i], scored, body.logprobs) if body.logprobs is not None else None
        return echo_text[i], lp, extra

    def body_fn(results):
        out = []
        for i, pieces in enumerate(results):
            text, lp, extra = prompt_part(i, pieces[0])
            finish = pieces[-1].finish_reason
            if max_tokens == 0:
                pieces, finish = [], "length"
            if body.logprobs is not None:
                generated = g.completion_logprobs(ctx, pieces, 0)
                lp = generated if lp is None else g.join_logprobs(lp, generated, len(text))
            out.append({"index": i, "text": text + "".join(p.text for p in pieces), "logprobs": lp,
                        "finish_reason": finish, **extra})
            completion_tokens[i] = len(pieces)
        return {**head, "choices": out, "usage": g.usage(prompt_tokens, sum(completion_tokens))}

    def chunk_of(i, text, lp, finish, extra=None):
        chunk = {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish,
                                      **(extra or {})}]}
        return {**chunk, "usage": None} if body.include_usage else chunk

    def chunks_fn(i, piece):
        out = []
        if not started[i] and (body.echo or body.prompt_logprobs is not None):
            text, lp, extra = prompt_part(i, piece)  # the prompt comes first, in its own chunk, as vLLM sends it
            text_offset[i] = len(text)
            if max_tokens == 0:
                return [chunk_of(i, text, lp, "length", extra)]
            out.append(chunk_of(i, text, lp, None, extra))
        started[i] = True
        completion_tokens[i] += 1
        lp = g.completion_logprobs(ctx, [piece], text_offset[i]) if body.logprobs is not None else None
        text_offset[i] += len(piece.text)
        out.append(chunk_of(i, piece.text, lp, piece.finish_reason))
        return out

    def tail_fn():
        return [{**head, "choices": [], "usage": g.usage(prompt_tokens, sum(completion_tokens))}
                ] if body.include_usage else []

    return await _respond(request, choices, body.stream, body_fn, chunks_fn, tail_fn)


async def create_chat_completion(ctx: g.GenContext, model: str, body: ChatCompletionRequest, request: Request,
                                 adapter: str | None = None):
    ids = await asyncio.to_thread(_chat_prompt, ctx, body)  # off the event loop
    # no max_tokens: whatever room the context leaves, capped by the server's default (at least 1, so
    # an over-long prompt is still a 400)
    room = ctx.max_context - len(ids)
    max_tokens = body.requested_max_tokens or max(1, min(room, ctx.max_tokens_default or room))
    g.check_prompt(ctx, ids, max_tokens, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    guides = await guides_for(ctx, body, body.n)
    choices = g.start_choices(ctx, [ids], [[body.sampling_params(max_tokens, top, j, body.prompt_logprobs, guides[j],
                                                                ctx.sampling_defaults)
                                            for j in range(body.n)]], adapter)
    rid, created = g.new_id("chatcmpl"), int(time.time())
    completion_tokens = [0] * len(choices)
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    started = [False] * len(choices)

    def body_fn(results):
        out = [{"index": i, "message": {"role": "assistant", "content": "".join(p.text for p in pieces)},
                "logprobs": g.chat_logprobs(ctx, pieces) if body.logprobs else None,
                "finish_reason": pieces[-1].finish_reason} for i, pieces in enumerate(results)]
        extra = {} if body.prompt_logprobs is None else {  # vLLM's extension, beside the choices
            "prompt_logprobs": g.vllm_prompt_logprobs(ctx, ids, results[0][0].event.prompt_logprobs,
                                                      body.prompt_logprobs)}
        return {**head, "object": "chat.completion", "choices": out,
                "usage": g.usage(len(ids), sum(len(p) for p in results)), **extra}

    def chunk(i, delta, logprobs=None, finish=None):
        c = {**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        return {**c, "usage": None} if body.include_usage else c

    def chunks_fn(i, piece):
        out = []
        if not started[i]:  # the role comes first, in its own chunk, as OpenAI sends it
            started[i] = True
            out.append(chunk(i, {"role": "assistant", "content": ""}))
        completion_tokens[i] += 1
        lp = g.chat_logprobs(ctx, [piece]) if body.logprobs else None
        out.append(chunk(i, {"content": piece.text}, lp, piece.finish_reason))
        return out

    def tail_fn():
        return [{**head, "choices": [], "usage": g.usage(len(ids), sum(completion_tokens))}
                ] if body.include_usage else []

    return await _respond(request, choices, body.stream, body_fn, chunks_fn, tail_fn)
