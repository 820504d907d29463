"""Every refusal the server makes, in OpenAI's error shape, as the `openai` client sees it."""
import threading

import httpx
import openai
import pytest

from serve_support import HTTP, client, fake_server, metric, wait_until


@pytest.fixture(scope="module")
def server(tok):
    with fake_server(tok, max_context=64, max_body_bytes=4096) as s:
        yield s


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_prompt_plus_max_tokens_over_the_context_names_both_numbers(server, tok):
    api = client(server[0])
    ids = list(range(5, 45))  # 40 prompt tokens + 30 > 64
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="fake", prompt=ids, max_tokens=30)
    err = e.value.body
    assert "40" in err["message"] and "30" in err["message"] and "64" in err["message"]
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:  # chat: the templated prompt alone is too long
        api.chat.completions.create(model="fake", messages=[{"role": "user", "content": "fox " * 80}])
    n = len(tok.apply_chat_template([{"role": "user", "content": "fox " * 80}]))
    assert str(n) in e.value.body["message"] and "64" in e.value.body["message"]
    # exactly at the limit is fine
    r = api.completions.create(model="fake", prompt=ids, max_tokens=24, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 24


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"stop": [""]}, "stop"),
    ({"suffix": "and then"}, "suffix"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"seed": "x"}, "seed"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [70000]]}, "prompt"),
    ({"model": None}, "model"),
])
def test_invalid_completion_fields_are_400_naming_the_field(server, fields, param):
    body = {"model": "fake", "prompt": "hello", "max_tokens": 4, **fields}
    r = HTTP.post(f"{server[0]}/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "hi"}], "messages.0.role"),
    ([{"role": "user"}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages.0.content.0.type"),
])
def test_invalid_chat_messages_are_400(server, messages, param):
    r = HTTP.post(f"{server[0]}/v1/chat/completions", json={"model": "fake", "messages": messages})
    assert r.status_code == 400 and error_of(r)["param"] == param


def test_bad_json_and_unknown_routes(server):
    r = HTTP.post(f"{server[0]}/v1/completions", content=b'{"model": "fake", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = HTTP.get(f"{server[0]}/v1/nothing-here")
    assert r.status_code == 404 and "/v1/nothing-here" in error_of(r)["message"]


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server[0]).completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "gpt-17" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client(server[0]).chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])


def test_api_key(tok):
    with fake_server(tok, api_key="sesame") as (url, _, _):
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, api_key="wrong").completions.create(model="fake", prompt="hi", max_tokens=2)
        assert e.value.body["code"] == "invalid_api_key"
        r = HTTP.post(f"{url}/v1/completions", json={"model": "fake", "prompt": "hi"})  # no header at all
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert HTTP.get(f"{url}/v1/models").status_code == 401
        assert HTTP.post(f"{url}/tokenize", json={"prompt": "x"}).status_code == 401
        ok = client(url, api_key="sesame").completions.create(model="fake", prompt="hi", max_tokens=2)
        assert ok.usage.prompt_tokens > 0
        assert HTTP.get(f"{url}/health").status_code == 200  # health and metrics stay open to monitors
        assert HTTP.get(f"{url}/metrics").status_code == 200


def test_full_queue_is_429_with_retry_after(tok):
    """One slot and one waiting place: a third request is refused, and served once there is room."""
    with fake_server(tok, max_slots=1, max_waiting=1, step_delay=0.01) as (url, engine, _):
        api = client(url)
        long = dict(model="fake", prompt="a", max_tokens=100, extra_body={"ignore_eos": True})
        results = []
        threads = [threading.Thread(target=lambda: results.append(api.completions.create(**long)))
                   for _ in range(2)]
        threads[0].start()
        assert wait_until(lambda: metric(url, "rsdjax:num_requests_running") == 1)
        threads[1].start()
        assert wait_until(lambda: metric(url, "rsdjax:num_requests_waiting") == 1)
        with pytest.raises(openai.RateLimitError) as e:
            api.completions.create(model="fake", prompt="b", max_tokens=2)
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):  # streaming requests are refused before the stream starts
            api.completions.create(model="fake", prompt="b", max_tokens=2, stream=True)
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 2 and all(r.usage.completion_tokens == 100 for r in results)
        assert api.completions.create(model="fake", prompt="b", max_tokens=2).usage.completion_tokens >= 1


def test_request_body_over_the_limit_is_413(server):
    url = server[0]
    big = {"model": "fake", "prompt": "x" * 5000, "max_tokens": 2}
    r = HTTP.post(f"{url}/v1/completions", json=big)
    assert r.status_code == 413 and "4096" in error_of(r)["message"]

    def chunked():  # no Content-Length: the limit still applies while reading
        yield b'{"model": "fake", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = HTTP.post(f"{url}/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert metric(url, "rsdjax:request_errors_total") >= 2
    # the server is unharmed
    assert client(url).completions.create(model="fake", prompt="ok", max_tokens=2).choices


def test_an_engine_failure_fails_requests_instead_of_hanging_them(tok):
    """If a decode step raises, running requests get 500, /health turns 503 (so routers drop the server)."""
    from rsdjax.serve.app import create_app
    from rsdjax.serve.fake_engine import FakeEngine
    from rsdjax.serve.launch import ServerThread

    class BrokenEngine(FakeEngine):
        def generate(self):
            if self.steps >= 3:
                raise RuntimeError("device lost")
            return super().generate()

    engine = BrokenEngine(vocab_size=tok.vocab_size, eos_token_ids=tok.eos_ids)
    with ServerThread(create_app(engine, tok, ["fake"])) as server:
        api = client(server.url)
        with pytest.raises(openai.InternalServerError) as e:  # 500: the engine's fault
            api.completions.create(model="fake", prompt="x", max_tokens=10, extra_body={"ignore_eos": True})
        assert e.value.status_code == 500 and "device lost" in e.value.body["message"]
        health = HTTP.get(f"{server.url}/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]
        with pytest.raises(openai.InternalServerError):  # and new requests are refused at once
            api.completions.create(model="fake", prompt="x", max_tokens=2)


def test_cli_refuses_bad_arguments_in_one_line(capsys):
    from rsdjax.cli import main

    assert main(["serve"]) == 2
    assert "give --model PATH" in capsys.readouterr().err
    assert main(["serve", "--fake-engine", "--max-slots", "0"]) == 2
    assert "--max-slots" in capsys.readouterr().err
    assert main(["route", "--backend", "localhost:8000"]) == 2
    err = capsys.readouterr().err
    assert "localhost:8000" in err and len(err.strip().splitlines()) == 1
