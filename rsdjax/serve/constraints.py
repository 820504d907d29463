"""From a request's output constraint (response_format, structured_outputs, guided_*) to one grammar
guide per choice, compiled once per server by `rsdjax.infer.structured.GrammarCompiler`.

A bad schema, regex or choice list is a 400 naming the field; compiling runs off the event loop.
"""
from __future__ import annotations

import asyncio
import json
import threading

from rsdjax.serve.errors import bad_request
from rsdjax.serve.generation import GenContext

_lock = threading.Lock()


def _compiler(ctx: GenContext):
    """The server's grammar compiler, made on first use (llguidance reads the whole vocabulary once)."""
    with _lock:
        compiler = getattr(ctx, "_grammar_compiler", None)
        if compiler is None:
            from rsdjax.infer.structured import GrammarCompiler

            engine = ctx.scheduler.engine
            compiler = GrammarCompiler.for_tokenizer(ctx.tokenizer, ctx.vocab_size or ctx.tokenizer.vocab_size,
                                                     engine.eos_token_ids)
            ctx._grammar_compiler = compiler
        return compiler


def _compile(ctx: GenContext, kind: str, field: str, value, count: int) -> list:
    from rsdjax.infer.structured import GrammarError

    compiler = _compiler(ctx)
    if kind == "json_schema" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"{field}: not valid JSON ({e})", field) from None
    build = {"json_schema": lambda: compiler.json_schema(value, field), "json_object": compiler.json_object,
             "regex": lambda: compiler.regex(value, field), "choice": lambda: compiler.choice(value, field)}[kind]
    try:
        return [build() for _ in range(count)]  # one matcher per choice: each advances with its own tokens
    except GrammarError as e:
        raise bad_request(f"invalid output constraint: {e}", field) from None


async def guides_for(ctx: GenContext, body, count: int) -> list:
    """`count` guides for the constraint `body` asks for, or `count` Nones when it asks for none."""
    found = body.constraints()
    if not found:
        return [None] * count
    if len(found) > 1:
        raise bad_request(f"{' and '.join(f for _, f, _ in found)}: give only one output constraint", found[1][1])
    kind, field, value = found[0]
    if ctx.tokenizer is None:
        raise bad_request(f"{field}: this server has no tokenizer, so it cannot constrain output", field)
    return await asyncio.to_thread(_compile, ctx, kind, field, value, count)
