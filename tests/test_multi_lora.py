"""Many LoRA adapters in one server: each request's greedy tokens equal peft + transformers with that
adapter, whatever shares its batch; loading and unloading at run time compiles nothing and never
pulls an adapter from under a running request; unknown adapters are 404s in OpenAI's shape."""
import asyncio

import openai
import pytest
import torch

from infer_support import compiled_shapes as compiled
from infer_support import confident_hf_dir, hf_model
from rsdjax.serve.app import create_app
from rsdjax.serve.launch import ServerThread
from serve_support import HTTP, async_client, client, metric

pytestmark = pytest.mark.slow

PROMPT = [1, 17, 200, 33, 90, 4]
N = 10
ADAPTERS = {  # different ranks, targets and layers, so padding and zero entries are exercised
    "qa": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "legal": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "small": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]),
}


def greedy(model, n=N):
    with torch.no_grad():
        return model.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """{name: (directory, peft greedy tokens)} plus "base": plain transformers."""
    from peft import LoraConfig, get_peft_model

    base = confident_hf_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("adapters")
    out = {"base": (base, greedy(hf_model(base)))}
    for seed, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = get_peft_model(hf_model(base), LoraConfig(**kw))
        with torch.no_grad():  # B starts at zero: give it values, as training would
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0, 0.3)
        model.save_pretrained(root / name)
        out[name] = (root / name, greedy(model.eval()))
    tokens = [t for _, t in out.values()]
    assert len({tuple(t) for t in tokens}) == len(tokens), "every adapter must change the output"
    return out


# paged: pages of 4 tokens, so the prompt's first page is cached and found again; pages are keyed by
# the adapter that wrote them, else the base's page would serve an adapter's request (and vice versa)
ENGINES = {"paged": dict(kind="paged", page_size=4), "slots": dict(kind="slots")}


@pytest.fixture(scope="module", params=list(ENGINES))
def live(request, adapters):
    from rsdjax.infer.engine import load_engine

    engine, _ = load_engine(adapters["base"][0], max_slots=4, max_context=64, max_loras=3, max_lora_rank=8,
                            adapters={"qa": str(adapters["qa"][0]), "legal": str(adapters["legal"][0])},
                            **ENGINES[request.param])
    if hasattr(engine, "warmup"):  # as `rsdjax serve` does: every shape compiled before the first request
        engine.warmup()
    with ServerThread(create_app(engine, None, ["base"])) as server:
        yield server.url, engine


def ids_of(choice) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]  # no tokenizer: ids as text


async def complete(url, model, n=N):
    async with async_client(url) as api:
        r = await api.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0,
                                         extra_body={"ignore_eos": True})
    return ids_of(r.choices[0])


def test_adapters_and_base_in_one_batch_equal_peft(live, adapters):
    url, engine = live
    alone = {m: asyncio.run(complete(url, m)) for m in ("base", "qa", "legal")}  # one at a time
    before = compiled(engine)
    r = HTTP.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "small", "lora_path": str(adapters["small"][0])})
    assert r.status_code == 200, r.text

    async def together():
        return await asyncio.gather(*(complete(url, m) for m in ("base", "qa", "legal", "small")))

    batched = dict(zip(("base", "qa", "legal", "small"), asyncio.run(together())))
    assert compiled(engine) == before  # a new adapter is data: no step compiled again
    for name, got in batched.items():
        assert got == adapters[name][1], name  # == peft + transformers (base: plain transformers)
        if name in alone:
            assert got == alone[name], name
    adapted = 5  # qa and legal alone, then qa, legal and small in the batch
    assert metric(url, "rsdjax:lora_requests_total") == adapted
    assert metric(url, "rsdjax:lora_generation_tokens_total") == adapted * N
    if hasattr(engine, "pool"):  # paged: the repeated prompts found their cached first page
        assert engine.stats()["prefix_cache_hits"] > 0
    cards = {m.id: m for m in client(url).models.list().data}
    assert set(cards) == {"base", "qa", "legal", "small"}
    assert cards["qa"].parent == "base" and cards["qa"].root == str(adapters["qa"][0]) and cards["base"].parent is None


def test_unload_under_a_running_request_lets_it_finish(live, adapters):
    url, engine = live
    if "legal" not in {m.id for m in client(url).models.list().data}:
        HTTP.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(adapters["legal"][0])})
    before = compiled(engine)

    async def scenario():
        long = asyncio.create_task(complete(url, "legal", n=50))
        while not HTTP.get(f"{url}/health").json()["running"]:
            await asyncio.sleep(0.005)
        r = await asyncio.to_thread(HTTP.post, f"{url}/v1/unload_lora_adapter", json={"lora_name": "legal"})
        assert r.status_code == 200, r.text
        pinned = [e for e in engine.adapters._entries.values() if e.name == "legal"]
        assert pinned and pinned[0].draining and pinned[0].users == 1  # still held by the running request
        with pytest.raises(openai.NotFoundError):  # gone for new requests at once
            await complete(url, "legal")
        return await long

    tokens = asyncio.run(scenario())
    assert len(tokens) == 50 and tokens[:N] == adapters["legal"][1]  # finished on its own adapter
    assert compiled(engine) == before
    r = HTTP.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(adapters["legal"][0])})
    assert r.status_code == 200, r.text  # its entry came free once the request ended
    assert asyncio.run(complete(url, "legal")) == adapters["legal"][1]


def test_unknown_and_bad_adapters(live, adapters, tmp_path):
    url, _ = live
    with pytest.raises(openai.NotFoundError) as e:
        client(url).completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    err = e.value.response.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "nope" in err["message"]
    r = HTTP.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"
    r = HTTP.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = HTTP.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "qa", "lora_path": str(adapters["qa"][0])})
    assert r.status_code == 400 and "already loaded" in r.json()["error"]["message"]


@pytest.mark.parametrize("kind", list(ENGINES))
def test_pool_sharded_like_the_kernels_on_tensor_parallel(adapters, kind):
    """On tensor=4 the pool's A/B split over `tensor` where their kernels do (heads, mlp), and a
    batch of the base and three adapters still equals peft."""
    from rsdjax.infer.engine import load_engine
    from rsdjax.infer.interface import Request, SamplingParams
    from rsdjax.parallel.mesh import make_mesh

    mesh = make_mesh({"tensor": 4})
    engine, _ = load_engine(adapters["base"][0], mesh=mesh, max_slots=4, max_context=32, max_lora_rank=8,
                            adapters={n: str(adapters[n][0]) for n in ("qa", "legal", "small")}, **ENGINES[kind])
    layer = engine.adapters.layers[0]
    assert "tensor" in layer["wq"]["b"].sharding.spec and "tensor" in layer["w_up"]["b"].sharding.spec
    assert "tensor" in layer["w_down"]["a"].sharding.spec and "tensor" in layer["wo"]["a"].sharding.spec
    names = ["base", "qa", "legal", "small"]
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    out = {n: [] for n in names}
    for slot, n in enumerate(names):
        prefix = engine.prefill(Request(n, PROMPT, params, 0 if n == "base" else engine.adapters.acquire(n)))
        if prefix.first_token is not None:  # the slot engine samples it in prefill, the paged one in generate
            out[n].append(prefix.first_token.token_id)
        engine.insert(prefix, slot)
    while any(len(v) < N for v in out.values()):
        for event in engine.generate():
            out[event.request_id].append(event.token_id)
    for n in names:
        assert out[n][:N] == adapters[n][1], n
