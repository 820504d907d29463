"""Prompt scoring over the fake engine: `echo`, `max_tokens: 0`, `prompt_logprobs`, in OpenAI's and vLLM's shapes.

The reference is the engine's own generation: a prompt P continued greedily by G, with the logprob
of each generated token, must score those same logprobs when P + G is sent back with echo (what
lm-evaluation-harness relies on). The real model against transformers is in test_lm_eval_serve.py.
"""
import json

import pytest

from rsdjax.infer.interface import SamplingParams
from serve_support import HTTP, client, fake_server


@pytest.fixture(scope="module")
def server(tok):
    with fake_server(tok) as s:
        yield s


def generated(engine, ids, n):
    """The fake engine alone, greedy: (token ids, their logprobs, top-3 ids -> logprob)."""
    events = engine.complete_alone(ids, SamplingParams(max_tokens=n, temperature=0, logprobs=3, ignore_eos=True))
    return [e.token_id for e in events], [e.logprob for e in events], [e.top_logprobs for e in events]


def test_echo_scores_what_generation_reported(server, tok):
    api = client(server[0])
    prompt = tok.encode("The quick brown fox", add_bos=True)
    gen_ids, gen_lps, gen_tops = generated(server[1], prompt, 6)
    continued = prompt + gen_ids
    r = api.completions.create(model="fake", prompt=continued, max_tokens=0, echo=True, logprobs=3, temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.text == tok.decode(continued, skip_special_tokens=False)
    assert len(lp.tokens) == len(continued) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(prompt):] == pytest.approx(gen_lps, abs=1e-6)
    for scored, reported in zip(lp.top_logprobs[len(prompt):], gen_tops):  # greedy: the top 3 hold the token
        assert scored == pytest.approx({tok.decode([t], skip_special_tokens=False): v for t, v in reported.items()},
                                       abs=1e-6)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == c.text


def test_echo_with_generation_is_prompt_then_completion(server, tok):
    api = client(server[0])
    prompt = tok.encode("jumps over", add_bos=True)
    gen_ids, gen_lps, _ = generated(server[1], prompt, 4)
    text = tok.decode(gen_ids)
    r = api.completions.create(model="fake", prompt=prompt, max_tokens=4, echo=True, logprobs=1, temperature=0,
                               extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == tok.decode(prompt, skip_special_tokens=False) + text
    assert len(c.logprobs.tokens) == len(prompt) + 4 and r.usage.completion_tokens == 4
    assert c.logprobs.token_logprobs[len(prompt):] == pytest.approx(gen_lps, abs=1e-6)
    # every prompt position names its own token among the top ones (vLLM does the same)
    for token, top in zip(c.logprobs.tokens[1:len(prompt)], c.logprobs.top_logprobs[1:len(prompt)]):
        assert token in top


def test_streamed_echo_equals_the_body(server, tok):
    prompt = tok.encode("a b c", add_bos=True)
    body = {"model": "fake", "prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 2, "temperature": 0}
    whole = HTTP.post(f"{server[0]}/v1/completions", json=body).json()["choices"][0]
    with HTTP.stream("POST", f"{server[0]}/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [c["choices"][0] for c in chunks]
    assert "".join(p["text"] for p in parts) == whole["text"]
    assert sum((p["logprobs"]["token_logprobs"] for p in parts), []) == whole["logprobs"]["token_logprobs"]
    assert parts[-1]["finish_reason"] == whole["finish_reason"]


def test_prompt_logprobs_in_vllm_shape(server, tok):
    prompt = tok.encode("The quick brown fox", add_bos=True)
    body = {"model": "fake", "prompt": prompt, "max_tokens": 0, "prompt_logprobs": 2}
    c = HTTP.post(f"{server[0]}/v1/completions", json=body).json()["choices"][0]
    echo = HTTP.post(f"{server[0]}/v1/completions", json={**body, "echo": True, "logprobs": 0}).json()["choices"][0]
    scored = c["prompt_logprobs"]
    assert c["text"] == "" and scored[0] is None and len(scored) == len(prompt)
    for t, entry, lp in zip(prompt[1:], scored[1:], echo["logprobs"]["token_logprobs"][1:]):
        assert entry[str(t)]["logprob"] == pytest.approx(lp, abs=1e-6)
        ranks = sorted(v["rank"] for k, v in entry.items() if k != str(t))
        assert ranks == [1, 2] and entry[str(t)]["rank"] >= 1
        assert max(v["logprob"] for v in entry.values()) == next(v["logprob"] for v in entry.values()
                                                               if v["rank"] == 1)
    chat = HTTP.post(f"{server[0]}/v1/chat/completions", json={
        "model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
        "prompt_logprobs": 1}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"),  # nothing to generate and nothing asked about the prompt
    ({"max_tokens": 0, "echo": True, "logprobs": 21}, "logprobs"),
    ({"max_tokens": 0, "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"max_tokens": -1, "echo": True}, "max_tokens"),
])
def test_bad_scoring_requests_are_400(server, fields, param):
    r = HTTP.post(f"{server[0]}/v1/completions", json={"model": "fake", "prompt": "hi", **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]
