"""Structured output through the server over the real engines, paged and slots (tiny model, byte-level
tokenizer).

The model is random, so whatever holds comes from the grammar masks applied in the jitted sampler:
sampled (temperature 1) outputs under a nested schema all validate with `jsonschema`, regex and
choice constraints hold, constrained and free rows share one batch, and a new schema compiles
nothing. Refusals (bad schema, bad regex, two constraints) are 400s naming the field.
"""
import asyncio
import json
import re

import jsonschema
import pytest

from infer_support import compiled_shapes as compiled
from infer_support import confident_dir_with_tokenizer, shared_engine
from rsdjax.serve.app import create_app
from rsdjax.serve.launch import ServerThread
from serve_support import HTTP, async_client

pytestmark = pytest.mark.slow

PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"enum": ["old", "new", "big"]}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"city": {"enum": ["Tokyo", "Osaka"]},
                                                   "vip": {"type": "boolean"}},
                  "required": ["city", "vip"], "additionalProperties": False},
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
CITIES = ["Tokyo", "Osaka", "New \"York\""]


@pytest.fixture(scope="module", params=["paged", "slots"])
def live(request, tmp_path_factory, tiny_tokenizer_dir):
    model_dir = confident_dir_with_tokenizer(tmp_path_factory, tiny_tokenizer_dir)
    engine, tokenizer = shared_engine(model_dir, max_slots=8, max_context=128, kind=request.param)
    # no warm-up (test_paged_engine and test_serve_e2e cover it): only the shapes these tests run
    # are compiled
    with ServerThread(create_app(engine, tokenizer, ["tiny"])) as server:
        yield server.url, engine


async def sample_all(url, requests):
    api = async_client(url)
    return await asyncio.gather(*(api.completions.create(model="tiny", temperature=1.0, **r) for r in requests))


def test_sampled_json_regex_choice_and_free_rows_in_one_batch(live):
    url, engine = live
    schema_format = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
    requests = [dict(prompt=f"Pet {i}:", n=10, max_tokens=110, seed=i, extra_body={"response_format": schema_format})
                for i in range(5)]
    requests += [dict(prompt="Date:", n=4, max_tokens=20, seed=7, extra_body={"structured_outputs": {"regex": DATE}}),
                 dict(prompt="City:", n=4, max_tokens=20, seed=8, extra_body={"guided_choice": CITIES}),
                 dict(prompt="Free text", max_tokens=100, seed=9, extra_body={"ignore_eos": True})]
    results = asyncio.run(sample_all(url, requests))
    pets = [c for r in results[:5] for c in r.choices]
    assert len(pets) == 50
    for c in pets:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PET)
    assert len({c.text for c in pets}) > 10  # sampled, not one greedy answer repeated
    for c in results[5].choices:
        assert re.fullmatch(DATE, c.text), c.text
    assert all(c.text in CITIES for c in results[6].choices)
    assert len(results[7].choices[0].text) > 0 and results[7].usage.completion_tokens == 100

    # a new schema, regex and choice set: masks are data, nothing compiles again
    before = compiled(engine)
    other = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
             "required": ["ok", "n"], "additionalProperties": False}
    again = asyncio.run(sample_all(url, [
        dict(prompt="Pet 0:", n=4, max_tokens=40, extra_body={"structured_outputs": {"json": other}}),
        dict(prompt="Date:", n=2, max_tokens=20, extra_body={"guided_regex": "[a-c]{3}x"}),
        dict(prompt="City:", n=2, max_tokens=20, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})]))
    assert compiled(engine) == before
    for c in again[0].choices:
        jsonschema.validate(json.loads(c.text), other)
    assert all(re.fullmatch("[a-c]{3}x", c.text) for c in again[1].choices)
    assert all(c.text in ("yes", "no") for c in again[2].choices)


def test_json_object_on_chat(live):
    url, _ = live
    r = HTTP.post(f"{url}/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "JSON"}], "n": 3, "temperature": 1.0,
        "max_tokens": 90, "seed": 3, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert c["finish_reason"] == "stop" and isinstance(json.loads(c["message"]["content"]), dict)


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "nope"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
])
def test_bad_constraints_are_400(live, fields, param, words):
    r = HTTP.post(f"{live[0]}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4, **fields})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
