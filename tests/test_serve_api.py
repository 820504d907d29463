"""The OpenAI-compatible server, driven by the official `openai` client, over the deterministic fake engine.

Expected outputs are never written down: they come from the engine run alone (no server), decoded
with the real tokenizer, so the tests check that the server carries tokens and text faithfully.
"""
import json

import pytest

from serve_support import HTTP, client, fake_server, metric, reference, wait_until

PROMPTS = ["The quick brown fox", "日本語のテキスト", "jumps over the lazy dog", "a"]


@pytest.fixture(scope="module")
def server(tok):
    with fake_server(tok, step_delay=0.001) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    return client(server[0])


def test_completion_matches_engine_alone(api, server, tok):
    _, engine, _ = server
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_bos=True)
        text, out_ids, finish = reference(engine, tok, ids, max_tokens=12, temperature=0.0)
        r = api.completions.create(model="fake", prompt=prompt, max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.model == "fake" and r.id.startswith("cmpl-")
        assert r.choices[0].text == text
        assert r.choices[0].finish_reason == finish
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out_ids))
        assert r.usage.total_tokens == len(ids) + len(out_ids)


def test_token_prompts_and_several_prompts_give_one_choice_each(api, server, tok):
    _, engine, _ = server
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    r = api.completions.create(model="fake", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for ids, choice in zip(prompts, r.choices):
        assert choice.text == reference(engine, tok, ids, max_tokens=5, temperature=0.0)[0]
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)


def test_default_max_tokens_is_16(api, server, tok):
    r = api.completions.create(model="fake", prompt="hello", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_chat_uses_the_llama3_template(api, server, tok):
    _, engine, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}]
    ids = tok.apply_chat_template(messages)
    text, out_ids, finish = reference(engine, tok, ids, max_tokens=10, temperature=0.0)
    r = api.chat.completions.create(model="fake", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out_ids))
    # content given as a list of text parts means the same
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    r2 = api.chat.completions.create(model="fake", messages=parts, max_tokens=10, temperature=0)
    assert r2.choices[0].message.content == text


def test_streaming_completion_with_usage(api, server, tok):
    prompt = PROMPTS[0]
    whole = api.completions.create(model="fake", prompt=prompt, max_tokens=20, temperature=0)
    chunks = list(api.completions.create(model="fake", prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    *token_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in token_chunks) == whole.choices[0].text
    assert len(token_chunks) == whole.usage.completion_tokens  # one chunk per generated token
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert all(c.usage is None for c in token_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_streaming_chat_and_raw_sse_framing(api, server, tok):
    messages = [{"role": "user", "content": "Hello there"}]
    whole = api.chat.completions.create(model="fake", messages=messages, max_tokens=8, temperature=0)
    chunks = list(api.chat.completions.create(model="fake", messages=messages, max_tokens=8, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # the wire format itself: `data: {...}` events separated by blank lines, ending in `data: [DONE]`
    body = {"model": "fake", "messages": messages, "max_tokens": 3, "stream": True}
    with HTTP.stream("POST", f"{server[0]}/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert [json.loads(e[6:])["object"] for e in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)


def test_stop_strings_cut_the_text(api, server, tok):
    _, engine, _ = server
    ids = tok.encode(PROMPTS[2], add_bos=True)
    text, _, _ = reference(engine, tok, ids, max_tokens=40, temperature=0.0, ignore_eos=True)
    clean = [i for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip()]
    stop = text[clean[len(clean) // 2]:clean[len(clean) // 2] + 2]  # a 2-character stop string from mid-output
    expected = text[:text.find(stop)]
    for stream in (False, True):
        r = api.completions.create(model="fake", prompt=PROMPTS[2], max_tokens=40, temperature=0, stop=[stop, "\x07"],
                                   stream=stream, extra_body={"ignore_eos": True})
        chunks = list(r) if stream else [r]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
    # the stopped request's slot is freed (by the engine thread, before its next decode step)
    assert wait_until(lambda: metric(server[0], "rsdjax:num_requests_running") == 0)
    assert wait_until(lambda: len(server[1].free_slots()) == server[1].max_slots)


def test_eos_and_ignore_eos(api, server, tok):
    """Find (by the engine alone) a prompt whose greedy output ends in EOS; the server must agree."""
    _, engine, _ = server
    for i in range(400):
        ids = tok.encode(f"prompt {i}", add_bos=True)
        text, out_ids, finish = reference(engine, tok, ids, max_tokens=64, temperature=0.0)
        if finish == "stop":
            break
    assert finish == "stop" and out_ids[-1] in tok.eos_ids
    r = api.completions.create(model="fake", prompt=ids, max_tokens=64, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, "stop")
    assert r.usage.completion_tokens == len(out_ids)
    r = api.completions.create(model="fake", prompt=ids, max_tokens=len(out_ids) + 5, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == len(out_ids) + 5
    r = api.completions.create(model="fake", prompt=ids, max_tokens=64, temperature=0,
                               extra_body={"ignore_eos": True, "stop_token_ids": [out_ids[2]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3


def test_sampling_parameters_reach_the_engine(api, server, tok):
    _, engine, _ = server
    ids = tok.encode(PROMPTS[0], add_bos=True)
    kw = dict(model="fake", prompt=ids, max_tokens=16)
    greedy = api.completions.create(temperature=0, **kw).choices[0].text
    # top_k=1 or a tiny top_p leave only the most likely token: sampling then equals greedy
    assert api.completions.create(temperature=1.0, extra_body={"top_k": 1}, **kw).choices[0].text == greedy
    assert api.completions.create(temperature=1.0, top_p=1e-6, **kw).choices[0].text == greedy
    # a seed makes sampling reproducible, and matches the engine alone with that seed
    a = api.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    assert a == api.completions.create(temperature=1.0, seed=7, **kw).choices[0].text
    assert a == reference(engine, tok, ids, max_tokens=16, temperature=1.0, seed=7)[0]
    assert a != greedy
    # n choices from one seeded request differ from each other, each reproducible
    two = api.completions.create(temperature=1.0, seed=7, n=2, **kw).choices
    assert len(two) == 2 and two[0].text == a and two[1].text != two[0].text
    # penalties change the greedy output of the engine exactly as they do alone
    for extra in ({"repetition_penalty": 1.5}, {"presence_penalty": 1.5, "frequency_penalty": 1.0}):
        fields = {k: v for k, v in extra.items()}
        got = api.completions.create(temperature=0, extra_body=fields, **kw).choices[0].text
        assert got == reference(engine, tok, ids, max_tokens=16, temperature=0.0, **fields)[0]


def test_logprobs(api, server, tok):
    r = api.completions.create(model="fake", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0.0
        # greedy picks the most likely token (top_logprobs is keyed by text, so tokens that decode
        # alike, such as partial UTF-8 bytes, share an entry: compare with >= rather than ==)
        assert chosen >= max(top.values()) - 1e-9
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    c = api.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)


def test_models_health_metrics_tokenize(api, server, tok):
    url = server[0]
    models = api.models.list().data
    assert [m.id for m in models] == ["fake"] and models[0].model_extra["max_model_len"] == 256
    health = HTTP.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["max_slots"] == 8
    before = metric(url, "rsdjax:generation_tokens_total")
    api.completions.create(model="fake", prompt="metrics", max_tokens=5, temperature=0,
                           extra_body={"ignore_eos": True})
    assert metric(url, "rsdjax:generation_tokens_total") == before + 5
    for name in ("rsdjax:num_requests_waiting", "rsdjax:kv_cache_usage_perc", "rsdjax:slot_usage_perc",
                 "rsdjax:time_to_first_token_seconds_count", "rsdjax:time_per_output_token_seconds_count",
                 "rsdjax:e2e_request_latency_seconds_count", "rsdjax:prompt_tokens_total"):
        metric(url, name)
    assert metric(url, "rsdjax:e2e_request_latency_seconds_count") >= 1
    t = HTTP.post(f"{url}/tokenize", json={"prompt": "quick fox"}).json()
    assert t["tokens"] == tok.encode("quick fox", add_bos=True) and t["count"] == len(t["tokens"])
    chat = HTTP.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["tokens"] == tok.apply_chat_template([{"role": "user", "content": "x"}])
    d = HTTP.post(f"{url}/detokenize", json={"tokens": tok.encode("quick fox")}).json()
    assert d["prompt"] == "quick fox"
