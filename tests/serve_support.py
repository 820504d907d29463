"""Helpers for the server and router tests: live servers on 127.0.0.1 around the fake engine."""
from __future__ import annotations

import contextlib
import re
import time

import httpx
import openai

from rsdjax.infer.interface import SamplingParams
from rsdjax.serve.app import create_app
from rsdjax.serve.fake_engine import FakeEngine
from rsdjax.serve.launch import ServerThread
from rsdjax.serve.router import create_router_app
from rsdjax.tokenizer import Tokenizer

# one client for the whole session: httpx.get/post build a new client (and TLS context, ~0.15 s) per call
HTTP = httpx.Client(timeout=30)


@contextlib.contextmanager
def fake_server(tokenizer: Tokenizer | None, name: str = "fake", max_slots: int = 8, max_context: int = 256,
                step_delay: float = 0.0, **app_kwargs):
    """A live server (uvicorn thread) over a fresh FakeEngine; yields (url, engine, app)."""
    engine = FakeEngine(vocab_size=tokenizer.vocab_size if tokenizer else 512, max_slots=max_slots,
                        max_context=max_context, eos_token_ids=tokenizer.eos_ids if tokenizer else None,
                        step_delay=step_delay)
    app = create_app(engine, tokenizer, [name], **app_kwargs)
    with ServerThread(app) as server:
        yield server.url, engine, app


@contextlib.contextmanager
def router(urls, policy, **kwargs):
    """A live router (uvicorn thread) in front of `urls`; health checked every 0.2 s unless told."""
    kwargs.setdefault("health_interval", 0.2)
    with ServerThread(create_router_app(urls, policy=policy, **kwargs)) as server:
        yield server.url


@contextlib.contextmanager
def fake_server_processes(tokenizer_dir, log_dir, n: int = 2, *args):
    """`n` real `rsdjax serve --fake-engine` processes (so a SIGKILL is a real one): [(Popen, url)]."""
    from rsdjax.serve.launch import spawn, stop_process

    base = ["--fake-engine", "--tokenizer", str(tokenizer_dir), "--max-context", "256", "--log-level", "warning"]
    procs = []
    try:
        for i in range(n):
            procs.append(spawn("serve", [*base, *args], log_file=log_dir / f"backend{i}.log", timeout=120))
        yield procs
    finally:
        for proc, _ in procs:
            stop_process(proc)


def client(url: str, api_key: str = "unused", **kwargs) -> openai.OpenAI:
    # no automatic retries: a test must see the first answer (a 429 would otherwise be retried)
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, **kwargs)


def async_client(url: str, api_key: str = "unused", **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, **kwargs)


def reference(engine: FakeEngine, tokenizer: Tokenizer, prompt_ids: list[int], **params):
    """What the engine alone (no server) produces: (text, token ids, finish reason)."""
    events = engine.complete_alone(prompt_ids, SamplingParams(**params))
    ids = [e.token_id for e in events]
    return tokenizer.decode(ids), ids, events[-1].finish_reason


def metric(url: str, name: str) -> float:
    """The value of one Prometheus sample (summed over label sets) from `url`/metrics."""
    text = HTTP.get(f"{url}/metrics").text
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    if not values:
        raise AssertionError(f"{name} not in {url}/metrics")
    return sum(values)


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
