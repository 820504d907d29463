"""End to end: the server over the real slot engine (`rsdjax.infer.engine.load_engine`) on a tiny HF Llama.

Greedy outputs are checked against HF transformers' own logits (argmax step by step), and
concurrent requests against the same requests sent alone.
"""
import asyncio
import shutil

import pytest

from rsdjax.serve.app import create_app
from rsdjax.serve.launch import ServerThread, spawn, stop_process
from serve_support import HTTP, async_client, client, wait_until

pytestmark = pytest.mark.slow

MAX_CONTEXT = 128


@pytest.fixture(scope="module")
def model_dir(tiny_hf_dir, tiny_tokenizer_dir, tmp_path_factory):
    """The tiny HF model with its tokenizer beside it, as a user would have it."""
    path = tmp_path_factory.mktemp("served_model")
    for f in tiny_hf_dir.iterdir():
        shutil.copy(f, path / f.name)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def live(model_dir):
    from rsdjax.infer.engine import load_engine

    engine, tokenizer = load_engine(model_dir, max_slots=4, max_context=MAX_CONTEXT)
    assert tokenizer is not None, "load_engine should find tokenizer.json next to the model"
    with ServerThread(create_app(engine, tokenizer, ["tiny"])) as server:
        yield server.url, engine, tokenizer


def hf_greedy(model_dir, prompt_ids, n):
    """Greedy continuation from HF transformers' logits (no EOS stop), one full forward per token."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_greedy_completion_matches_transformers(live, model_dir):
    url, _, tok = live
    api = client(url)
    for prompt in ("The quick brown fox", "日本語のテキスト"):
        ids = tok.encode(prompt, add_bos=True)
        expected = tok.decode(hf_greedy(model_dir, ids, 12))
        r = api.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert r.choices[0].text == expected
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
        assert r.choices[0].finish_reason == "length"


def test_concurrent_requests_give_what_each_gives_alone(live):
    """More requests than slots, of different lengths: they join the running batch as slots free."""
    url, engine, _ = live
    api, aapi = client(url), async_client(url)
    requests = [dict(prompt=f"request {i}: " + "fox " * (i % 5), max_tokens=4 + 3 * (i % 4), temperature=0,
                     extra_body={"ignore_eos": True}) for i in range(10)]
    alone = [api.completions.create(model="tiny", **r).choices[0].text for r in requests]

    async def all_at_once():
        rs = await asyncio.gather(*(aapi.completions.create(model="tiny", **r) for r in requests))
        return [r.choices[0].text for r in rs]

    assert asyncio.run(all_at_once()) == alone
    assert len(engine.free_slots()) == engine.max_slots


def test_chat_streaming_and_usage(live):
    url, _, tok = live
    api = client(url)
    messages = [{"role": "user", "content": "Say something."}]
    whole = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert whole.usage.prompt_tokens == len(tok.apply_chat_template(messages))
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_errors_and_disconnect_with_the_real_engine(live):
    url, engine, tok = live
    api = client(url)
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="tiny", prompt=list(range(10, 110)), max_tokens=64)
    assert "100" in e.value.body["message"] and "64" in e.value.body["message"]
    body = {"model": "tiny", "prompt": "go on", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with HTTP.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        [next(lines) for _ in range(4)]
        assert len(engine.free_slots()) == engine.max_slots - 1
    assert wait_until(lambda: len(engine.free_slots()) == engine.max_slots, timeout=30)


def test_cli_serve_process_with_a_model(model_dir, tmp_path):
    proc, url = spawn("serve", ["--model", str(model_dir), "--max-slots", "2", "--max-context", str(MAX_CONTEXT),
                                "--log-level", "warning"], log_file=tmp_path / "serve.log", timeout=600)
    try:
        assert [m.id for m in client(url).models.list().data] == [model_dir.name]
        r = client(url).completions.create(model=model_dir.name, prompt="hello", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
    finally:
        stop_process(proc)
