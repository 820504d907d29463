"""Fault injection: 64 concurrent streams and 16 plain requests through the router to two real
server processes; 10 clients hang up mid-stream at random, one backend is SIGKILLed midway.

Every plain request succeeds (retried on the survivor), every stream either completes with the
text the engine gives alone or ends with an error event and [DONE]; afterwards the survivor has
no busy slot, its outputs for a fresh concurrent batch equal the same requests sent one by one,
and no request ran past its deadline.
"""
import asyncio
import json
import random
import time

import httpx
import pytest

from rsdjax.serve.fake_engine import FakeEngine
from rsdjax.serve.launch import ServerThread
from rsdjax.serve.router import create_router_app
from rsdjax.tokenizer import Tokenizer
from serve_support import HTTP, fake_server_processes, reference, wait_until

pytestmark = pytest.mark.slow

STREAMS, PLAIN, HANGUPS, MAX_TOKENS = 64, 16, 10, 40
REQUEST_TIMEOUT = 30.0  # the servers' --request-timeout: the deadline of every request


@pytest.fixture
def backends(tiny_tokenizer_dir, tmp_path):
    with fake_server_processes(tiny_tokenizer_dir, tmp_path, 2, "--max-slots", "16", "--fake-step-ms", "10",
                               "--request-timeout", str(REQUEST_TIMEOUT)) as procs:
        yield procs


def body(i, stream):
    return {"model": "fake", "prompt": f"fault injection request {i}", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def stream_one(http, url, i, hang_up_after, progress, open_on):
    """('done', text) | ('error', text) | ('hung up', text), and the seconds it took. While it runs,
    open_on[backend][i] counts the tokens it still expects (the router names the backend in a header)."""
    start, text, events = time.monotonic(), "", 0
    async with http.stream("POST", f"{url}/v1/completions", json=body(i, True)) as r:
        assert r.status_code == 200, await r.aread()
        streams_here = open_on.setdefault(r.headers["x-rsdjax-backend"], {})
        streams_here[i] = hang_up_after or MAX_TOKENS
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return ("done" if events == MAX_TOKENS else "error"), text, time.monotonic() - start
                event = json.loads(data)
                if "error" in event:
                    text = ("error", text)
                    continue
                if isinstance(text, tuple):
                    raise AssertionError(f"stream {i}: data after an error event")
                text += event["choices"][0]["text"]
                events += 1
                progress[0] += 1
                streams_here[i] -= 1
                if events == hang_up_after:
                    return "hung up", text, time.monotonic() - start
        finally:
            streams_here.pop(i)
    raise AssertionError(f"stream {i} ended without [DONE]")


async def plain_one(http, url, i):
    start = time.monotonic()
    r = await http.post(f"{url}/v1/completions", json=body(i, False))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], time.monotonic() - start


async def chaos(url, victim, victim_url):
    rng = random.Random(16)
    hang_ups = dict(zip(rng.sample(range(STREAMS), HANGUPS), (rng.randint(1, MAX_TOKENS - 1) for _ in range(HANGUPS))))
    progress, open_on = [0], {}
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT + 10, limits=httpx.Limits(max_connections=None)) as http:
        streams = [asyncio.create_task(stream_one(http, url, i, hang_ups.get(i), progress, open_on))
                   for i in range(STREAMS)]
        plain = [asyncio.create_task(plain_one(http, url, STREAMS + i)) for i in range(PLAIN)]
        # the kill comes once a quarter of the streamed tokens are out and a stream on the victim has ten
        # tokens to go (timing alone is not enough: on a fast machine the victim's streams may all be over)
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while progress[0] < STREAMS * MAX_TOKENS // 4 or max(open_on.get(victim_url, {}).values(), default=0) < 10:
            assert time.monotonic() < deadline, f"no stream in flight on the victim; open streams: {open_on}"
            await asyncio.sleep(0.005)
        victim.kill()
        return await asyncio.gather(*streams), await asyncio.gather(*plain), hang_ups


def test_streams_hangups_and_a_killed_backend(backends, tiny_tokenizer_dir):
    tok = Tokenizer.load(tiny_tokenizer_dir)
    engine = FakeEngine(vocab_size=tok.vocab_size, max_context=256, eos_token_ids=tok.eos_ids)
    want = lambda i: reference(engine, tok, tok.encode(body(i, False)["prompt"], add_bos=True),  # noqa: E731
                               max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)[0]
    (victim, victim_url), (_, survivor_url) = backends
    with ServerThread(create_router_app([victim_url, survivor_url], policy="least-loaded", health_interval=0.3,
                                        timeout=REQUEST_TIMEOUT)) as router:
        streams, plain, hang_ups = asyncio.run(chaos(router.url, victim, victim_url))

        for i, (outcome, text, _) in enumerate(streams):
            if outcome == "done":
                assert text == want(i), f"stream {i}"
            elif outcome == "error":  # the victim's streams: a prefix of the text, then the error event
                assert isinstance(text, tuple) and want(i).startswith(text[1]), f"stream {i}"
            else:
                assert i in hang_ups and want(i).startswith(text)
        outcomes = [o for o, _, _ in streams]
        # a client due to hang up on the victim may get the kill's error event first: then it cannot hang up
        assert all(outcomes[i] in ("hung up", "error") for i in hang_ups), [outcomes[i] for i in hang_ups]
        assert outcomes.count("hung up") >= HANGUPS // 2 and outcomes.count("done") >= STREAMS // 4
        assert outcomes.count("error") >= 1, "the kill hit no stream in flight"
        assert all(text == want(STREAMS + i) for i, (text, _) in enumerate(plain))
        took = [s for *_, s in streams] + [s for _, s in plain]
        assert max(took) < REQUEST_TIMEOUT, f"a request ran {max(took):.1f} s, past its deadline"

        # afterwards: no slot held on the survivor (hang-ups and the dead backend's retries all freed)
        assert wait_until(lambda: HTTP.get(f"{survivor_url}/health").json()["running"] == 0, timeout=5.0)
        assert HTTP.get(f"{survivor_url}/health").json()["waiting"] == 0
        assert victim.wait(timeout=10) != 0

        # a fresh batch, concurrent, equals the same requests one by one
        async def batch():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(plain_one(http, router.url, 1000 + i) for i in range(8)))

        together = [text for text, _ in asyncio.run(batch())]
        alone = [HTTP.post(f"{router.url}/v1/completions", json=body(1000 + i, False), timeout=60)
                 .json()["choices"][0]["text"] for i in range(8)]
        assert together == alone == [want(1000 + i) for i in range(8)]
