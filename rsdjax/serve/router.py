"""The router: one OpenAI endpoint in front of several `rsdjax serve` instances (RSD's router server).

A request goes to a healthy backend picked by the policy (`balance.py`). If that backend fails
before its response has started -- connection refused or dropped, or it answers 429/500/502/503 --
the request is sent to another backend after a short jittered pause (so retries of many clients
do not arrive together). A backend that fails (connection, 5xx other than its own request
deadline's 504, a timeout) is marked unhealthy at once and probed back half-open: GET /health
after a backoff that doubles with each consecutive failure (from --health-interval up to
MAX_BACKOFF), and the first probe that passes brings it back. On every way a request ends --
answered, timed out, client gone, retried -- the upstream response is closed, which is what tells
the backend to stop generating. Non-streamed responses are read whole before
anything is sent on, so they can always be retried; a stream is relayed as it comes, so once its
first byte has reached the client a backend failure ends the stream with an in-band error.
The server sends stream headers only with its first token, so a backend that dies before
producing anything is still retried.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rsdjax.serve.asgi import BodySizeLimit, wait_or_disconnect
from rsdjax.serve.balance import Backend, make_policy
from rsdjax.serve.errors import APIError, install_error_handlers, unavailable

PROXIED = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
FORWARDED_HEADERS = ("authorization", "content-type", "x-session-id", "x-request-id")
RETURNED_HEADERS = ("content-type", "retry-after")
# failures that mean "this backend did not handle the request": safe to send it elsewhere
BACKEND_GONE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                httpx.WriteError, httpx.PoolTimeout)
RETRIED = (429, 500, 502, 503)  # statuses another backend may answer better (nothing was generated for us)
UNWELL = (500, 502, 503)  # statuses that mark the backend unhealthy (429 is busy, not ill)
MAX_BACKOFF = 30.0  # seconds: the longest wait between probes of an unhealthy backend
RETRY_JITTER = 0.05  # seconds x attempt: the most a retry waits before trying the next backend


class RouterMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rsdjax_router:requests", "requests answered, by backend and status",
                                ["backend", "status"], registry=r)
        self.retries = Counter("rsdjax_router:retries", "attempts that failed before the response started",
                               ["backend"], registry=r)
        self.no_backend = Counter("rsdjax_router:no_backend", "requests refused with 503: no healthy backend",
                                  registry=r)
        self.healthy = Gauge("rsdjax_router:backend_healthy", "1 if the backend passed its last check",
                             ["backend"], registry=r)
        self.in_flight = Gauge("rsdjax_router:backend_in_flight", "requests in flight per backend",
                               ["backend"], registry=r)
        self.failures = Counter("rsdjax_router:backend_failures", "failures that marked the backend unhealthy, "
                                "by kind (connection, timeout, status, stream, health)", ["backend", "kind"], registry=r)
        self.probes = Counter("rsdjax_router:health_probes", "health checks, by result", ["backend", "result"],
                              registry=r)
        self.latency = Histogram("rsdjax_router:response_start_seconds", "request arrival to response start",
                                 buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r)


class ResetSafeTransport(httpx.AsyncHTTPTransport):
    """httpcore raises AttributeError when it asks a just-connected socket the backend already reset
    (now None) for its details; every caller (forwarding, health probes, /v1/models) sees a ConnectError."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except AttributeError as e:
            raise httpx.ConnectError(f"connection to {request.url} reset while connecting ({e})",
                                     request=request) from e


def create_router_app(backend_urls: list[str], policy: str = "least-loaded", timeout: float = 600.0,
                      health_interval: float = 2.0, max_body_bytes: int = 4 << 20) -> FastAPI:
    if not backend_urls:
        raise ValueError("route: give at least one --backend URL")
    backends = [Backend(u.rstrip("/")) for u in backend_urls]
    chooser = make_policy(policy)
    metrics = RouterMetrics()
    state: dict = {}

    def set_health(b: Backend, ok: bool, error: str | None = None, kind: str = "health") -> None:
        b.healthy, b.last_error = ok, error if not ok else None
        metrics.healthy.labels(b.url).set(1 if ok else 0)
        if ok:
            b.failures, b.next_check = 0, time.monotonic() + health_interval
        else:  # half-open after a backoff that doubles per consecutive failure (jittered: probes do not align)
            b.failures += 1
            metrics.failures.labels(b.url, kind).inc()
            backoff = min(MAX_BACKOFF, health_interval * 2 ** (b.failures - 1))
            b.next_check = time.monotonic() + backoff * random.uniform(0.8, 1.0)

    async def check(b: Backend) -> None:
        try:
            r = await state["client"].get(f"{b.url}/health", timeout=min(5.0, health_interval * 2))
            set_health(b, r.status_code == 200, None if r.status_code == 200 else f"health {r.status_code}")
            with contextlib.suppress(ValueError, AttributeError):  # other servers' /health may say nothing
                models = r.json().get("models")
                b.models = list(models) if isinstance(models, list) else b.models
        except httpx.HTTPError as e:
            set_health(b, False, repr(e))
        metrics.probes.labels(b.url, "ok" if b.healthy else "failed").inc()

    async def health_loop():
        while True:
            now = time.monotonic()
            await asyncio.gather(*(check(b) for b in backends if b.next_check <= now))
            soonest = min(b.next_check for b in backends)
            await asyncio.sleep(min(health_interval, max(0.01, soonest - time.monotonic())))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # the read timeout bounds the wait for a non-streamed answer, and the silence between stream chunks
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5.0),
                                     transport=ResetSafeTransport(limits=limits)) as client:
            state["client"] = client
            await asyncio.gather(*(check(b) for b in backends))
            task = asyncio.create_task(health_loop())
            yield
            task.cancel()

    app = FastAPI(title="rsdjax router", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.state.backends = backends

    def pick(model, session: str | None, tried: set) -> Backend | None:
        untried = [b for b in backends if b.serves(model) and b not in tried]
        # none healthy: try the ones marked down anyway (Envoy's "panic" routing) rather than answer
        # 503 at once -- under overload a slow connect can mark down every backend that is still up
        candidates = [b for b in untried if b.healthy] or untried
        return chooser.choose(candidates, session) if candidates else None

    def begin(b: Backend) -> None:
        b.in_flight += 1
        metrics.in_flight.labels(b.url).set(b.in_flight)

    def end(b: Backend, status: int | None) -> None:
        b.in_flight -= 1
        metrics.in_flight.labels(b.url).set(b.in_flight)
        if status is not None:
            b.served += 1
            metrics.requests.labels(b.url, str(status)).inc()

    def returned_headers(r: httpx.Response, b: Backend) -> dict:
        headers = {k: v for k, v in r.headers.items() if k.lower() in RETURNED_HEADERS}
        return {**headers, "x-rsdjax-backend": b.url}

    async def forward(request: Request, path: str, body: bytes):
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {}  # not JSON: the backend will say so
        payload = payload if isinstance(payload, dict) else {}
        session = request.headers.get("x-session-id") or payload.get("user")
        stream = payload.get("stream") is True
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        arrival, tried, refused = time.perf_counter(), set(), None
        model = payload.get("model") if isinstance(payload.get("model"), str) else None  # else: backend's 400
        if not any(b.serves(model) for b in backends if b.healthy) and any(b.healthy for b in backends):
            served = sorted({m for b in backends if b.healthy for m in b.models or ()})
            raise APIError(404, f"model {model!r} does not exist; the backends serve {', '.join(served)}",
                           param="model", code="model_not_found")
        while (b := pick(model, session if isinstance(session, str) else None, tried)) is not None:
            if tried:  # a retry: a short pause, jittered, growing with the attempts
                await asyncio.sleep(random.uniform(0, RETRY_JITTER * len(tried)))
            tried.add(b)
            begin(b)
            r = None
            try:
                req = state["client"].build_request("POST", f"{b.url}{path}", content=body, headers=headers)
                r = await state["client"].send(req, stream=True)
                content = None if stream and r.status_code == 200 else await r.aread()
            except BACKEND_GONE as e:  # nothing reached the client yet: try another backend
                await close(r)
                end(b, None)
                set_health(b, False, repr(e), "connection")
                metrics.retries.labels(b.url).inc()
                continue
            except httpx.TimeoutException:
                await close(r)  # the backend must stop generating for an answer nobody will read
                end(b, 504)
                set_health(b, False, f"no answer within {timeout:g} s", "timeout")
                raise APIError(504, f"backend {b.url} did not answer within {timeout:g} s",
                               type="timeout_error", code="backend_timeout") from None
            except BaseException:  # the client went away (cancelled) or anything unexpected
                await close(r)
                end(b, None)
                raise
            if r.status_code in UNWELL:
                set_health(b, False, f"answered {r.status_code}", "status")
            if r.status_code in RETRIED and len(tried) < len(backends):  # busy or unwell: another may not be
                end(b, r.status_code)
                metrics.retries.labels(b.url).inc()
                refused = (content, r.status_code, returned_headers(r, b))
                continue
            metrics.latency.observe(time.perf_counter() - arrival)
            if content is not None:
                end(b, r.status_code)
                return Response(content, r.status_code, returned_headers(r, b))
            return StreamingResponse(relay(r, b), r.status_code, returned_headers(r, b))
        if refused is not None:
            return Response(refused[0], refused[1], refused[2])
        metrics.no_backend.inc()
        raise unavailable(f"no healthy backend among {len(backends)} "
                          f"({', '.join(f'{x.url}: {x.last_error}' for x in backends)})")

    async def close(r: httpx.Response | None) -> None:
        if r is not None:
            with contextlib.suppress(httpx.HTTPError):
                await r.aclose()

    async def relay(r: httpx.Response, b: Backend):
        try:
            async for chunk in r.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:  # the backend died mid-stream: too late to retry, say so in-band
            set_health(b, False, repr(e), "stream")
            error = APIError(502, f"backend {b.url} failed mid-stream: {e!r}", type="server_error").body()
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await r.aclose()  # also what tells the backend that our client has gone
            end(b, r.status_code)

    def proxy(path: str):
        async def handler(request: Request):
            body = await request.body()  # read before watching for a disconnect: both consume `receive`
            return await wait_or_disconnect(request, forward(request, path, body))
        return handler

    for path in PROXIED:
        app.add_api_route(path, proxy(path), methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request):
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        live = [b for b in backends if b.healthy]

        async def ask(b):
            try:
                return await state["client"].get(f"{b.url}/v1/models", headers=headers, timeout=10.0)
            except httpx.HTTPError:
                return None

        answers = [r for r in await asyncio.gather(*(ask(b) for b in live)) if r is not None]
        good = [r for r in answers if r.status_code == 200]
        if not good and answers:  # e.g. every backend says 401: pass that on
            return Response(answers[0].content, answers[0].status_code, {"content-type": "application/json"})
        if not good:
            raise unavailable(f"no healthy backend among {len(backends)}")
        merged: dict[str, dict] = {}
        for r in good:
            for card in r.json().get("data", []):
                merged.setdefault(card["id"], card)
        return {"object": "list", "data": list(merged.values())}

    @app.get("/health")
    async def health():
        status = [{"url": b.url, "healthy": b.healthy, "in_flight": b.in_flight, "served": b.served,
                   "last_error": b.last_error} for b in backends]
        ok = any(b.healthy for b in backends)
        return JSONResponse({"status": "ok" if ok else "unavailable", "policy": chooser.name, "backends": status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
