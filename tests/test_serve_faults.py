"""The server under faults: unknown fields (vLLM's leniency), vLLM metric names, deadlines, engine
faults, prefill errors, cancellation during prefill, default max_tokens, tokenization off the loop."""
import json
import logging
import threading
import time

import httpx
import pytest

from rsdjax.cli import main as cli_main
from rsdjax.serve.app import create_app
from rsdjax.serve.fake_engine import FakeEngine
from rsdjax.serve.launch import ServerThread
from rsdjax.serve.metrics import ServerMetrics
from rsdjax.serve.scheduler import Scheduler
from serve_support import HTTP, fake_server, metric, wait_until

IDS = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def server(tok):
    with fake_server(tok) as s:
        yield s


def post(url, path, body, **kw):
    return HTTP.post(f"{url}{path}", json=body, **kw)


def sse_events(response: httpx.Response) -> list:
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


def test_unknown_fields_are_ignored_named_in_a_header_and_logged(server, caplog):
    url = server[0]
    with caplog.at_level(logging.WARNING, logger="rsdjax.serve"):
        r = post(url, "/v1/completions", {"model": "fake", "prompt": IDS, "max_tokens": 3, "no_stop_trim": True,
                                          "vllm_xargs": {"a": 1}})
        assert r.status_code == 200, r.text
        assert r.headers["x-ignored-fields"] == "no_stop_trim,vllm_xargs"
        chat = post(url, "/v1/chat/completions", {"model": "fake", "max_tokens": 2, "stream": True, "foo": 1,
                                                  "messages": [{"role": "user", "content": "hi", "bar": 2}]})
        assert chat.status_code == 200 and chat.headers["x-ignored-fields"] == "foo,messages.0.bar"
        assert sse_events(chat)[-1] == "[DONE]"
    logged = [r.getMessage() for r in caplog.records if "ignored unknown request fields" in r.getMessage()]
    assert any("no_stop_trim, vllm_xargs" in m for m in logged) and any("messages.0.bar" in m for m in logged)
    plain = post(url, "/v1/completions", {"model": "fake", "prompt": IDS, "max_tokens": 1})
    assert plain.status_code == 200 and "x-ignored-fields" not in plain.headers


def test_strict_fields_refuse_unknown_fields_with_400(tok):
    with fake_server(tok, strict_fields=True) as (url, _, _):
        r = post(url, "/v1/completions", {"model": "fake", "prompt": IDS, "no_stop_trim": True})
        assert r.status_code == 400 and r.json()["error"]["message"] == "no_stop_trim: unknown field"
        assert r.json()["error"]["param"] == "no_stop_trim"
        r = post(url, "/tokenize", {"prompt": "hi", "extra": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "extra"


def test_vllm_metric_names_are_exported_beside_ours(server):
    url = server[0]
    assert post(url, "/v1/completions", {"model": "fake", "prompt": IDS, "max_tokens": 4}).status_code == 200
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "generation_tokens_total",
                 "prompt_tokens_total"):
        assert metric(url, f"vllm:{name}") == metric(url, f"rsdjax:{name}"), name
    assert metric(url, "vllm:generation_tokens_total") >= 4
    # the load polls of vllm-router (/get_load) and of vLLM's server-load tracking (/load)
    assert HTTP.get(f"{url}/get_load").json()["load"] == 0 and HTTP.get(f"{url}/load").json() == {"server_load": 0}


def test_request_timeout_ends_the_request_with_504_and_frees_its_slot(tok):
    with fake_server(tok, step_delay=0.02, request_timeout=0.3) as (url, engine, _):
        body = {"model": "fake", "prompt": IDS, "max_tokens": 200, "ignore_eos": True}
        start = time.monotonic()
        r = post(url, "/v1/completions", body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert "request timeout of 0.3 s" in r.json()["error"]["message"]
        assert time.monotonic() - start < 2.0
        assert wait_until(lambda: engine.free_slots() == list(range(engine.max_slots)))
        stream = post(url, "/v1/completions", {**body, "stream": True})  # headers sent: the error is in-band
        events = sse_events(stream)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert len(events) > 3  # some tokens came before the deadline
        assert wait_until(lambda: engine.free_slots() == list(range(engine.max_slots)))


def test_chat_default_max_tokens_is_capped(tok):
    with fake_server(tok, max_context=256, max_tokens_default=5) as (url, _, _):
        r = post(url, "/v1/chat/completions", {"model": "fake", "ignore_eos": True,
                                               "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert r.json()["choices"][0]["finish_reason"] == "length"


class BrokenDecode(FakeEngine):
    def generate(self):
        raise RuntimeError("device lost")


class BrokenPrefill(FakeEngine):
    def prefill(self, request):
        self.check(request)
        raise ValueError("internal shape mismatch in the prefill step")  # not the request's fault


@pytest.mark.parametrize("engine_cls, what", [(BrokenDecode, "device lost"), (BrokenPrefill, "shape mismatch")])
def test_an_engine_fault_is_500_flips_health_and_logs_the_traceback(tok, engine_cls, what, caplog):
    engine = engine_cls(vocab_size=tok.vocab_size, max_slots=2, max_context=64)
    with caplog.at_level(logging.ERROR, logger="rsdjax.serve"), ServerThread(create_app(engine, tok, ["fake"])) as s:
        assert HTTP.get(f"{s.url}/health").status_code == 200
        r = post(s.url, "/v1/completions", {"model": "fake", "prompt": IDS, "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error" and what in r.text, r.text
        health = HTTP.get(f"{s.url}/health")
        assert health.status_code == 503 and what in health.json()["error"]
        after = post(s.url, "/v1/completions", {"model": "fake", "prompt": IDS, "max_tokens": 4})
        assert after.status_code == 503
    failures = [r for r in caplog.records if r.getMessage() == "engine failed"]
    assert failures and failures[0].exc_info is not None


class RecordingInserts(FakeEngine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.inserted = []

    def insert(self, prefix, slot):
        self.inserted.append(prefix.request.id)
        super().insert(prefix, slot)


def test_a_request_cancelled_during_its_prefill_is_not_inserted(tok):
    engine = RecordingInserts(vocab_size=tok.vocab_size, max_slots=2, max_context=256, prefill_delay_per_token=0.02)
    with ServerThread(create_app(engine, tok, ["fake"])) as s:
        ids = list(range(5, 45))  # 40 tokens: 0.8 s of prefill
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/completions", json={"model": "fake", "prompt": ids, "max_tokens": 50},
                       timeout=0.3)
        time.sleep(1.0)  # the prefill ends after the client has gone
        assert engine.inserted == [] and engine.steps == 0
        ok = post(s.url, "/v1/completions", {"model": "fake", "prompt": IDS, "max_tokens": 2})
        assert ok.status_code == 200 and len(engine.inserted) == 1


def test_max_waiting_zero_is_refused_at_start(tok, capsys):
    with pytest.raises(ValueError, match=r"max_waiting must be >= 1"):
        Scheduler(FakeEngine(), ServerMetrics("fake"), max_waiting=0)
    assert cli_main(["serve", "--fake-engine", "--max-waiting", "0"]) == 2
    assert capsys.readouterr().err.strip() == "rsdjax serve: error: serve: --max-waiting must be >= 1, got 0"


class SlowTokenizer:
    """The real tokenizer, but encoding takes a second (a huge prompt)."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, **kw):
        time.sleep(1.0)
        return self.tok.encode(text, **kw)


def test_tokenization_does_not_block_the_event_loop(tok):
    with fake_server(SlowTokenizer(tok)) as (url, _, _):
        slow = threading.Thread(target=post, args=(url, "/v1/completions",
                                                   {"model": "fake", "prompt": "hello", "max_tokens": 2}))
        slow.start()
        time.sleep(0.2)
        start = time.monotonic()
        assert HTTP.get(f"{url}/health").status_code == 200
        answered = time.monotonic() - start
        slow.join()
        assert answered < 0.5, f"/health waited {answered:.2f} s behind a tokenization"
