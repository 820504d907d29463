"""Continuous batching: simultaneous requests share decode steps yet each gets exactly its own output;
a client that goes away frees its slot at once."""
import asyncio
import time

import httpx
import pytest

from serve_support import HTTP, async_client, client, fake_server, metric, reference, wait_until


def test_32_simultaneous_requests_give_what_each_gives_alone(tok):
    with fake_server(tok, max_slots=8, step_delay=0.005) as (url, engine, _):
        api = client(url)
        requests = [dict(prompt=f"request number {i}: the fox", max_tokens=8 + (i * 7) % 25, temperature=0,
                         extra_body={"ignore_eos": i % 2 == 0}, stream=i % 4 == 3) for i in range(32)]

        def text_of(response, stream):
            if not stream:
                return response.choices[0].text, response.choices[0].finish_reason
            chunks = list(response)
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

        alone = [text_of(api.completions.create(model="fake", **r), r["stream"]) for r in requests]
        steps_alone = engine.steps
        # the same requests, all at once (more than the 8 slots: they queue and join the batch as slots free)
        aapi = async_client(url)

        async def one(r):
            response = await aapi.completions.create(model="fake", **r)
            if not r["stream"]:
                return response.choices[0].text, response.choices[0].finish_reason
            chunks = [c async for c in response]
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

        async def all_at_once():
            return await asyncio.gather(*(one(r) for r in requests))

        together = asyncio.run(all_at_once())
        steps_together = engine.steps - steps_alone
        assert together == alone
        for r, (text, finish) in zip(requests, alone):  # and both equal the engine without any server
            ids = tok.encode(r["prompt"], add_bos=True)
            ref = reference(engine, tok, ids, max_tokens=r["max_tokens"], temperature=0.0,
                            ignore_eos=r["extra_body"]["ignore_eos"])
            assert (text, finish) == (ref[0], ref[2])
        # batching really happened: far fewer decode steps than when each ran alone
        assert steps_together < steps_alone / 3
        assert len(engine.free_slots()) == 8  # freed before each request's last token was sent
        assert wait_until(lambda: metric(url, "rsdjax:num_requests_running") == 0)


def test_disconnect_mid_stream_frees_the_slot_at_once(tok):
    with fake_server(tok, max_slots=2, step_delay=0.02) as (url, engine, app):
        scheduler = app.state.ctx.scheduler
        body = {"model": "fake", "prompt": "tell me everything", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]  # a few tokens in (3 events and their blank lines)
                assert scheduler.load()["running"] == 1
                steps_at_close = engine.steps
            closed = time.monotonic()  # leaving the block closes the connection mid-stream
        assert all(not g or g.startswith("data: ") for g in got)
        assert wait_until(lambda: len(engine.free_slots()) == 2, timeout=5)
        freed_after = time.monotonic() - closed
        # within a few 20 ms decode steps (generous, for a loaded machine), not after the remaining ~190 tokens
        assert freed_after < 2.0
        assert engine.steps - steps_at_close < 100
        assert scheduler.load() == {"running": 0, "waiting": 0, "max_slots": 2, "max_waiting": 256}
        # a non-streamed request whose client gives up (timeout) is cancelled the same way
        with pytest.raises(httpx.TimeoutException):
            HTTP.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        assert wait_until(lambda: len(engine.free_slots()) == 2, timeout=5)
        # and a waiting request whose client leaves is dropped from the queue
        holders = [http_stream_open(url, body) for _ in range(2)]
        try:
            assert wait_until(lambda: scheduler.load()["running"] == 2)
            with pytest.raises(httpx.TimeoutException):
                HTTP.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
            assert wait_until(lambda: scheduler.load()["waiting"] == 0, timeout=5)
        finally:
            for client_, response in holders:
                response.close()
                client_.close()
        assert wait_until(lambda: len(engine.free_slots()) == 2, timeout=5)


def http_stream_open(url, body):
    c = httpx.Client(timeout=30)
    response = c.send(c.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
    return c, response
