"""The router in front of two live servers (fake engines, uvicorn threads on 127.0.0.1)."""
import threading

import httpx
import openai
import pytest

from rsdjax.serve.launch import free_ports
from serve_support import HTTP, client, fake_server, metric, router, wait_until


@pytest.fixture(scope="module")
def backends(tok):
    """Two servers of the same model, as (url, engine, app)."""
    with fake_server(tok, step_delay=0.005) as a, fake_server(tok, step_delay=0.005) as b:
        yield a, b


def served_by(url, n=1, **request):
    """Send `n` non-streamed completions; return the backend URL that answered each."""
    out = []
    for _ in range(n):
        body = {"model": "fake", "prompt": "hello", "max_tokens": 2, **request}
        headers = body.pop("headers", {})
        r = HTTP.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        out.append(r.headers["x-rsdjax-backend"])
    return out


def test_round_robin_spreads_requests_evenly(backends):
    urls = [b[0] for b in backends]
    with router(urls, "round-robin") as url:
        before = [metric(u, "rsdjax:request_success_total") for u in urls]
        order = served_by(url, 8)
        assert order[:2] in (urls, urls[::-1]) and order == order[:2] * 4
        after = [metric(u, "rsdjax:request_success_total") for u in urls]
        assert [a - b for a, b in zip(after, before)] == [4, 4]  # as the backends themselves count


def test_least_loaded_avoids_the_busy_backend(backends):
    urls = [b[0] for b in backends]
    long = {"model": "fake", "prompt": "long", "max_tokens": 150, "ignore_eos": True, "stream": True}
    for policy, expect_all_on_idle in (("least-loaded", True), ("round-robin", False)):
        with router(urls, policy) as url, httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{url}/v1/completions", json=long) as busy:
                busy_backend = busy.headers["x-rsdjax-backend"]
                idle = [u for u in urls if u != busy_backend][0]
                order = served_by(url, 4)
            assert (order == [idle] * 4) == expect_all_on_idle
    # under concurrent load, least-loaded keeps the in-flight counts within one of each other
    with router(urls, "least-loaded") as url:
        results = []
        threads = [threading.Thread(target=lambda: results.extend(served_by(url, 1, max_tokens=40,
                                                                             ignore_eos=True)))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert min(results.count(u) for u in urls) >= 3


def test_a_session_sticks_to_its_backend(backends):
    urls = [b[0] for b in backends]
    with router(urls, "session") as url:
        homes = {}
        for i in range(16):
            key = f"session-{i}"
            by_header = served_by(url, 3, headers={"X-Session-ID": key})
            by_user = served_by(url, 3, user=key)
            assert len(set(by_header)) == 1 and set(by_user) == set(by_header)
            homes[key] = by_header[0]
        assert set(homes.values()) == set(urls)  # 16 sessions do not all hash to one backend
        # the header wins over the user field
        key = next(k for k, v in homes.items() if v == urls[0])
        other = next(k for k, v in homes.items() if v == urls[1])
        assert served_by(url, 2, headers={"X-Session-ID": key}, user=other) == [urls[0]] * 2


def test_streaming_through_the_router_and_disconnect_frees_the_backend_slot(backends):
    (url_a, engine_a, _), (url_b, engine_b, _) = backends
    with router([url_a, url_b], "round-robin") as url:
        api = client(url)
        direct = client(url_a).completions.create(model="fake", prompt="stream me", max_tokens=12, temperature=0)
        chunks = list(api.completions.create(model="fake", prompt="stream me", max_tokens=12, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks[:-1]) == direct.choices[0].text
        assert chunks[-1].usage == direct.usage
        body = {"model": "fake", "prompt": "long", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                engine = engine_a if r.headers["x-rsdjax-backend"] == url_a else engine_b
                lines = r.iter_lines()
                [next(lines) for _ in range(4)]
                assert len(engine.free_slots()) == engine.max_slots - 1
        assert wait_until(lambda: len(engine.free_slots()) == engine.max_slots, timeout=5)


def test_merged_models_and_routing_by_model(tok):
    with fake_server(tok, name="alpha") as (a, _, _), fake_server(tok, name="beta") as (b, _, _):
        with router([a, b], "round-robin") as url:
            assert sorted(m.id for m in client(url).models.list().data) == ["alpha", "beta"]
            assert served_by(url, 3, model="beta") == [b] * 3
            assert served_by(url, 3, model="alpha") == [a] * 3
            with pytest.raises(openai.NotFoundError):
                client(url).completions.create(model="gamma", prompt="x", max_tokens=2)


def test_no_healthy_backend_is_503():
    dead = [f"http://127.0.0.1:{port}" for port in free_ports(2)]
    with router(dead, "least-loaded") as url:
        r = HTTP.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        assert HTTP.get(f"{url}/health").status_code == 503
        assert HTTP.get(f"{url}/v1/models").status_code == 503
        assert metric(url, "rsdjax_router:no_backend_total") == 1
        with pytest.raises(openai.InternalServerError):
            client(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])


def test_backend_errors_pass_through_and_timeouts_are_504(tok):
    with fake_server(tok, step_delay=0.05, api_key="k") as (a, _, _):
        with router([a], "least-loaded", timeout=0.5) as url:
            with pytest.raises(openai.AuthenticationError):  # the backend's own 401 comes back unchanged
                client(url, api_key="wrong").completions.create(model="fake", prompt="x", max_tokens=2)
            with pytest.raises(openai.BadRequestError) as e:
                client(url, api_key="k").completions.create(model="fake", prompt="x", max_tokens=10**6)
            assert "1000000" in e.value.body["message"] and "256" in e.value.body["message"]  # the backend's
            r = HTTP.post(f"{url}/v1/completions", headers={"authorization": "Bearer k"}, timeout=30,
                           json={"model": "fake", "prompt": "x", "max_tokens": 100, "ignore_eos": True})
            assert r.status_code == 504 and r.json()["error"]["code"] == "backend_timeout"
            r = HTTP.post(f"{url}/v1/completions", content=b"x" * (5 << 20))
            assert r.status_code == 413


def test_router_metrics_and_health(backends):
    urls = [b[0] for b in backends]
    with router(urls, "round-robin") as url:
        served_by(url, 4)
        health = HTTP.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["policy"] == "round-robin"
        assert [b["served"] for b in health["backends"]] == [2, 2]
        assert metric(url, "rsdjax_router:requests_total") == 4
        assert metric(url, "rsdjax_router:backend_healthy") == 2
        assert metric(url, "rsdjax_router:response_start_seconds_count") == 4


def test_a_connection_reset_while_connecting_is_retried_on_the_other_backend(backends, monkeypatch):
    # httpcore raises AttributeError when it asks a socket the peer reset during the connect (now None)
    urls = [b[0] for b in backends]
    real_send = httpx.AsyncHTTPTransport.handle_async_request

    async def send(self, request):
        if str(request.url).startswith(urls[0]) and request.url.path == "/v1/completions":
            raise AttributeError("'NoneType' object has no attribute 'getpeername'")
        return await real_send(self, request)

    with router(urls, "round-robin") as url:
        monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", send)
        assert served_by(url, 4) == [urls[1]] * 4
