"""The OpenAI-compatible server: `create_app(engine, tokenizer, ...)` -> a FastAPI app.

Routes: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize; GET /v1/models,
/health, /metrics, /get_load and /load (the request load, for routers). With an API key, every
route but the last four needs `Authorization: Bearer KEY` (health checks, load polls and
Prometheus scrapes stay keyless, as in vLLM).
The engine runs in the scheduler's thread, started and stopped with the app (lifespan).
Unknown request fields are ignored with a warning and named in `x-ignored-fields` (vLLM's
behaviour), or refused with 400 when `strict_fields`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rsdjax.infer.interface import Engine
from rsdjax.serve import openai_api
from rsdjax.serve.asgi import BodySizeLimit
from rsdjax.serve.errors import APIError, bad_request, install_error_handlers, model_not_found
from rsdjax.serve.generation import GenContext
from rsdjax.serve.lora_routes import install_lora_routes
from rsdjax.serve.metrics import ServerMetrics
from rsdjax.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                   ModelList, TokenizeRequest, ignored_fields)
from rsdjax.serve.scheduler import Scheduler
from rsdjax.tokenizer import Tokenizer

DEFAULT_MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 128K-token prompt as JSON ids fits, a runaway upload does not
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds from arrival to the last token
DEFAULT_MAX_TOKENS = 4096  # chat without max_tokens: the context's remaining room, but at most this
log = logging.getLogger("rsdjax.serve")


def create_app(engine: Engine, tokenizer: Tokenizer | None, model_names: list[str], api_key: str | None = None,
               max_waiting: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               max_tokens_default: int | None = DEFAULT_MAX_TOKENS, strict_fields: bool = False,
               sampling_defaults: dict | None = None) -> FastAPI:
    if not model_names:
        raise ValueError("create_app: need at least one served model name")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds (or None for no limit), got {request_timeout}")
    if max_tokens_default is not None and max_tokens_default < 1:
        raise ValueError(f"max_tokens_default must be >= 1, got {max_tokens_default}")
    metrics = ServerMetrics(model_names[0])
    scheduler = Scheduler(engine, metrics, max_waiting=max_waiting)
    # token ids are checked against the model's vocabulary if the engine tells it, else the tokenizer's
    vocab = getattr(engine, "vocab_size", None) or (tokenizer.vocab_size if tokenizer is not None else None)
    adapters = getattr(engine, "adapters", None)  # an AdapterPool when the engine serves LoRA adapters
    ctx = GenContext(scheduler, tokenizer, metrics, engine.max_context, vocab, request_timeout, max_tokens_default,
                     adapters, dict(sampling_defaults or {}))

    def unknown_fields(body, request: Request) -> list[str]:
        """vLLM's leniency: log the fields we ignore (or refuse them when strict)."""
        fields = ignored_fields(body)
        if fields and strict_fields:
            raise bad_request(f"{fields[0]}: unknown field", fields[0])
        if fields:
            log.warning("%s: ignored unknown request fields: %s", request.url.path, ", ".join(fields))
        return fields

    def tag(response, fields: list[str]):
        if fields:
            response.headers["x-ignored-fields"] = ",".join(fields)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="rsdjax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(_CountErrors, metrics=metrics)  # outermost, so refusals by the size limit count too

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str | None) -> str:
        """The served name: a base model name or a loaded adapter's (404 for anything else)."""
        adapter_names = [n for n, _ in adapters.names()] if adapters is not None else []
        if name is not None and name not in model_names and name not in adapter_names:
            raise model_not_found(f"model {name!r} does not exist; this server serves "
                                  f"{', '.join(model_names + adapter_names)}")
        return name or model_names[0]

    def adapter_of(name: str) -> str | None:
        return None if name in model_names else name

    auth = [Depends(check_key)]

    @app.get("/health")
    async def health():
        if scheduler.dead is not None:
            return JSONResponse({"status": "error", "error": repr(scheduler.dead)}, status_code=503)
        return {"status": "ok", "models": model_names, **scheduler.load()}  # the router reads both

    # what load-aware routers poll (keyless, like /health): vllm-router's power_of_two reads
    # /get_load's "load", vLLM's own server-load tracking answers /load with "server_load"
    @app.get("/get_load")
    async def get_load():
        load = scheduler.load()
        return {"load": load["running"] + load["waiting"], **load}

    @app.get("/load")
    async def server_load():
        load = scheduler.load()
        return {"server_load": load["running"] + load["waiting"]}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        cards = [ModelCard(id=n, max_model_len=engine.max_context) for n in model_names]
        for name, path in adapters.names() if adapters is not None else []:  # as vLLM lists them
            cards.append(ModelCard(id=name, root=path, parent=model_names[0], max_model_len=engine.max_context))
        return ModelList(data=cards)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        fields = unknown_fields(body, request)
        name = check_model(body.model)
        return tag(await openai_api.create_completion(ctx, name, body, request, adapter_of(name)), fields)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        fields = unknown_fields(body, request)
        name = check_model(body.model)
        return tag(await openai_api.create_chat_completion(ctx, name, body, request, adapter_of(name)), fields)

    install_lora_routes(app, adapters, auth, unknown_fields)

    def tokenizer_request(body, request: Request, response: Response) -> None:
        """What /tokenize and /detokenize check first: the model name, and that there is a tokenizer."""
        tag(response, unknown_fields(body, request))
        check_model(body.model)
        if tokenizer is None:
            raise bad_request("this server has no tokenizer")

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest, request: Request, response: Response):
        tokenizer_request(body, request, response)

        def encode():  # off the event loop: a long prompt must not stall every other request
            if body.messages is None:
                return tokenizer.encode(body.prompt, add_bos=body.add_special_tokens and tokenizer.add_bos)
            try:
                return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
            except ValueError as e:
                raise bad_request(f"messages: {e}", "messages") from None

        ids = await asyncio.to_thread(encode)
        return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest, request: Request, response: Response):
        tokenizer_request(body, request, response)
        bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise bad_request(f"tokens: token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})",
                              "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app


class _CountErrors:
    """Pure ASGI (not BaseHTTPMiddleware, which would get in the way of streaming and disconnects)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.error(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
