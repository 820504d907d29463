"""The router under backend faults: timeouts and client disconnects abort the backend's work,
5xx marks a backend unhealthy and it is probed back with backoff, a backend dying mid-stream ends
the client's stream with an error event and [DONE]."""
import json
import time

import httpx
import pytest

from rsdjax.serve.launch import ServerThread
from serve_support import HTTP, fake_server, metric, router, wait_until

BODY = {"model": "fake", "prompt": "hello", "max_tokens": 200, "ignore_eos": True}  # 200 x 50 ms = 10 s of work


def all_free(engine) -> bool:
    return engine.free_slots() == list(range(engine.max_slots))


def test_a_router_timeout_aborts_the_backend_request(tok):
    with fake_server(tok, step_delay=0.05) as (a, engine, _), router([a], "round-robin", timeout=0.3) as url:
        r = HTTP.post(f"{url}/v1/completions", json=BODY, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "backend_timeout"
        assert wait_until(lambda: all_free(engine), timeout=2.0), "the backend kept generating after the 504"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_aborts_the_backend_request(tok, stream):
    with fake_server(tok, step_delay=0.05) as (a, engine, _), router([a], "round-robin") as url:
        if stream:  # hang up after a few chunks
            with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True}, timeout=30) as r:
                chunks = r.iter_raw()
                for _ in range(3):
                    next(chunks)
        else:  # give up waiting for the answer
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json=BODY, timeout=0.5)
        assert wait_until(lambda: all_free(engine), timeout=2.0), "the backend kept generating for a gone client"


class StubBackend:
    """A raw ASGI backend whose answers a test sets: health status, and what completions do."""

    def __init__(self):
        self.health, self.health_hits, self.completions = 200, 0, "503"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["path"] == "/health":
            self.health_hits += 1
            return await self._json(send, self.health, {"status": "ok", "models": ["fake"]})
        while (await receive()).get("more_body"):
            pass
        if self.completions == "503":
            return await self._json(send, 503, {"error": {"message": "unwell", "type": "x", "param": None, "code": None}})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(), "more_body": True})
        raise RuntimeError("the backend process died")  # uvicorn drops the connection mid-body

    @staticmethod
    async def _json(send, status, body):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def backend_state(url, backend):
    return next(b for b in HTTP.get(f"{url}/health").json()["backends"] if b["url"] == backend)


def test_a_503_marks_the_backend_unhealthy_and_it_is_probed_back_with_backoff(tok):
    stub = StubBackend()
    with ServerThread(stub) as s, fake_server(tok) as (good, _, _), \
            router([s.url, good], "round-robin", health_interval=0.1) as url:
        answers = [HTTP.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 2}, timeout=30) for _ in range(4)]
        assert all(r.status_code == 200 and r.headers["x-rsdjax-backend"] == good for r in answers)
        # each 503 marked it down (its /health still says ok, so a probe may have brought it back since)
        assert metric(url, "rsdjax_router:backend_failures_total") >= 1
        stub.health = 503  # still unwell: probes back off (0.1, 0.2, 0.4, 0.8 s ...) instead of every 0.1 s
        assert wait_until(lambda: not backend_state(url, s.url)["healthy"], timeout=2.0)
        hits = stub.health_hits
        time.sleep(2.0)
        assert stub.health_hits - hits <= 6, f"{stub.health_hits - hits} probes in 2 s"
        stub.health = 200  # recovered: the next probe brings it back
        assert wait_until(lambda: backend_state(url, s.url)["healthy"], timeout=5.0)


def test_a_backend_dying_mid_stream_ends_the_stream_with_an_error_and_done(tok):
    stub = StubBackend()
    stub.completions = "die"
    with ServerThread(stub) as s, router([s.url], "round-robin") as url:
        r = HTTP.post(f"{url}/v1/completions", json={**BODY, "stream": True}, timeout=30)
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert [json.loads(e)["choices"][0]["text"] for e in events[:3]] == ["t0", "t1", "t2"]
        assert "failed mid-stream" in json.loads(events[3])["error"]["message"] and events[4:] == ["[DONE]"]
        assert not backend_state(url, s.url)["healthy"]
