"""A backend process is killed (SIGKILL) in the middle of 64 requests: none of them fails.

The backends are real `rsdjax serve --fake-engine` processes, so the kill is a real one: open
connections are reset and new ones refused, and the router must retry on the survivor.
"""
import concurrent.futures
import threading

import pytest

from rsdjax.serve.fake_engine import FakeEngine
from rsdjax.serve.launch import ServerThread
from rsdjax.serve.router import create_router_app
from rsdjax.tokenizer import Tokenizer
from serve_support import HTTP, client, fake_server_processes, metric, reference


@pytest.fixture
def two_backend_processes(tiny_tokenizer_dir, tmp_path):
    with fake_server_processes(tiny_tokenizer_dir, tmp_path, 2, "--fake-step-ms", "5") as procs:
        yield procs


def test_backend_killed_during_64_requests_loses_none(two_backend_processes, tiny_tokenizer_dir):
    tok = Tokenizer.load(tiny_tokenizer_dir)
    (victim, victim_url), (_, survivor_url) = two_backend_processes
    prompts = [f"request {i} to the router" for i in range(64)]
    with ServerThread(create_router_app([victim_url, survivor_url], policy="round-robin",
                                        health_interval=0.5)) as router:
        api = client(router.url, timeout=60)
        done = threading.Semaphore(0)

        def one(prompt):
            r = api.completions.with_raw_response.create(model="fake", prompt=prompt, max_tokens=24,
                                                         temperature=0, extra_body={"ignore_eos": True})
            done.release()
            return r.headers["x-rsdjax-backend"], r.parse().choices[0].text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, p) for p in prompts]
            for _ in range(16):  # a quarter of the run has completed, and 8 more are in flight
                assert done.acquire(timeout=60)
            victim.kill()
            results = [f.result(timeout=120) for f in futures]  # raises if any request failed
        engine = FakeEngine(vocab_size=tok.vocab_size, max_context=256, eos_token_ids=tok.eos_ids)
        for prompt, (_, text) in zip(prompts, results):
            ids = tok.encode(prompt, add_bos=True)
            assert text == reference(engine, tok, ids, max_tokens=24, temperature=0.0, ignore_eos=True)[0]
        served = [backend for backend, _ in results]
        assert served.count(victim_url) >= 8 and served.count(survivor_url) >= 32
        # requests were in flight on the victim when it died: the router retried them elsewhere
        assert metric(router.url, "rsdjax_router:retries_total") >= 1
        health = HTTP.get(f"{router.url}/health").json()
        assert [b["healthy"] for b in health["backends"]] == [False, True]
        assert victim.wait(timeout=10) != 0
