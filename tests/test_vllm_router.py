"""`rsdjax serve` behind vLLM's own router (vllm-router, the peer): every policy that needs no KV
events, streaming and not, and one backend SIGKILLed in the middle of streams."""
import concurrent.futures
import os
import shutil
import signal
import subprocess
import threading
import time

import httpx
import openai
import pytest

from rsdjax.serve.fake_engine import FakeEngine
from rsdjax.serve.launch import free_ports, spawn, stop_process
from serve_support import client, reference

pytestmark = pytest.mark.slow  # ~30 s: two servers and six routers as subprocesses

POLICIES = ["round_robin", "power_of_two", "cache_aware", "consistent_hash", "sticky_least_loaded"]
ROUTER = shutil.which("vllm-router") or os.path.join(os.path.dirname(os.sys.executable), "vllm-router")


def serve_fake(tokenizer_dir, tmp_path, name):
    return spawn("serve", ["--fake-engine", "--tokenizer", str(tokenizer_dir), "--fake-step-ms", "5"],
                 log_file=tmp_path / f"{name}.log", timeout=60)


@pytest.fixture(scope="module")
def alone(tok):
    """The engine `rsdjax serve --fake-engine --tokenizer` builds, run alone: the expected outputs."""
    return FakeEngine(vocab_size=tok.vocab_size, max_slots=1, max_context=2048, eos_token_ids=tok.eos_ids)


@pytest.fixture(scope="module")
def backends(tiny_tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_router")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both start at once
        procs = list(pool.map(lambda name: serve_fake(tiny_tokenizer_dir, tmp, name), ("a", "b")))
    try:
        yield [url for _, url in procs]
    finally:
        for proc, _ in procs:
            stop_process(proc)


def launch_router(urls, policy, log_path, ports=None):
    """`ports`: (its port, its metrics listener's); two fresh ones if not given."""
    assert os.path.exists(ROUTER), "vllm-router is not installed (pip install vllm-router==0.1.17, the test extra)"
    port, metrics_port = ports or free_ports(2)
    log = open(log_path, "ab")
    proc = subprocess.Popen([ROUTER, "--worker-urls", *urls, "--policy", policy, "--host", "127.0.0.1",
                             "--port", str(port), "--health-check-interval-secs", "1",
                             "--worker-startup-check-interval", "1", "--log-level", "warning",
                             # its own metrics listener defaults to one fixed port: give each router its own
                             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)],
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def start_router(urls, policy, log_path):
    return wait_router(*launch_router(urls, policy, log_path), log_path)


def wait_router(proc, url, log_path):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vllm-router exited with {proc.returncode}; see {log_path}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    stop_process(proc)
    raise AssertionError(f"vllm-router on {url} not healthy after 30 s; see {log_path}")


@pytest.fixture(scope="module")
def routers(backends, tmp_path_factory):
    """One vllm-router per policy in front of the same two servers, started side by side."""
    tmp = tmp_path_factory.mktemp("routers")
    ports = free_ports(2 * len(POLICIES))  # all different: each router binds two
    launched = {p: launch_router(backends, p, tmp / f"{p}.log", ports[2 * i:2 * i + 2]) for i, p in enumerate(POLICIES)}

    def healthy(policy):
        log = tmp / f"{policy}.log"
        try:
            return wait_router(*launched[policy], log)[1]
        except AssertionError:
            if "Address already in use" not in log.read_text(errors="replace"):
                raise
        # a port was taken (another test's server) between choosing it and the router binding it: once more
        launched[policy] = launch_router(backends, policy, log)
        return wait_router(*launched[policy], log)[1]

    try:
        yield {p: healthy(p) for p in POLICIES}
    finally:
        for proc, _ in launched.values():
            stop_process(proc)


@pytest.mark.parametrize("policy", POLICIES)
def test_completions_and_chat_through_vllm_router(routers, policy, tok, alone):
    url = routers[policy]
    api = client(url, timeout=30)
    assert [m.id for m in api.models.list().data] == ["fake"]
    for i in range(4):
        prompt = f"the fox number {i}"
        want, _, finish = reference(alone, tok, tok.encode(prompt, add_bos=True), max_tokens=12, temperature=0.0,
                                    ignore_eos=True)
        r = api.completions.create(model="fake", prompt=prompt, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True}, extra_headers={"X-Session-ID": f"s{i}"})
        assert r.choices[0].text == want and r.choices[0].finish_reason == finish == "length"
        chunks = api.completions.create(model="fake", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    messages = [{"role": "user", "content": "hello there"}]
    want, _, _ = reference(alone, tok, tok.apply_chat_template(messages), max_tokens=8, temperature=0.0,
                           ignore_eos=True)
    chat = api.chat.completions.create(model="fake", messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == want
    streamed = api.chat.completions.create(model="fake", messages=messages, max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want


def test_a_backend_killed_mid_stream_behind_vllm_router(backends, tiny_tokenizer_dir, tok, alone, tmp_path):
    victim, victim_url = serve_fake(tiny_tokenizer_dir, tmp_path, "victim")
    router, url = start_router([backends[0], victim_url], "round_robin", tmp_path / "router.log")
    try:
        api = client(url, timeout=30)
        prompt = "a long story"
        want, _, _ = reference(alone, tok, tok.encode(prompt, add_bos=True), max_tokens=200, temperature=0.0,
                               ignore_eos=True)
        results = {}

        def stream(i):
            text = ""
            try:
                for c in api.completions.create(model="fake", prompt=prompt, max_tokens=200, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}):
                    text += c.choices[0].text if c.choices else ""
                results[i] = ("done", text)
            except openai.APIError as e:  # the router drops the client's connection: an error, not a hang
                results[i] = ("error", text, e)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.4)  # every stream has started (200 tokens take ~1 s)
        victim.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a stream hung after its backend died"
        done = [r for r in results.values() if r[0] == "done"]
        failed = [r for r in results.values() if r[0] == "error"]
        assert all(text == want for _, text in done) and len(done) + len(failed) == 6
        assert failed and all(want.startswith(r[1]) for r in failed)  # the victim's streams: a prefix, then an error
        # afterwards every request succeeds, on the backend that is left
        short, _, _ = reference(alone, tok, tok.encode("after", add_bos=True), max_tokens=5, temperature=0.0,
                                ignore_eos=True)
        for _ in range(6):
            r = api.completions.create(model="fake", prompt="after", max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
            assert r.choices[0].text == short
    finally:
        stop_process(router)
        stop_process(victim)
