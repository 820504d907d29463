"""PagedEngine against the contiguous SlotEngine and HF: mixed lengths, meshes, prefix hits, a cache too
small for the load (eviction + preemption), no page leak, and the limits it refuses."""
import numpy as np
import pytest

from infer_support import confident_hf_dir, hf_model, shared_engine
from rsdjax.infer.generate import generate
from rsdjax.infer.interface import Engine, PromptTooLongError, Request, SamplingParams
from rsdjax.infer.pages import PagePool
from test_infer_engine import hf_greedy

CONTEXT = 128
PAGED = dict(kind="paged", page_size=8, num_pages=64, max_step_tokens=32)  # 4 slots x 128 tokens = 64 pages
LENGTHS = (3, 9, 17, 6, 30, 12, 41, 5)
PARAMS = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3),
          SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True),
          SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
          SamplingParams(max_tokens=16, temperature=1.5, top_k=8, seed=9, ignore_eos=True)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return confident_hf_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def workload():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in LENGTHS]
    return prompts, [PARAMS[i % len(PARAMS)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def contiguous(model_dir, workload):
    prompts, params = workload
    return generate(shared_engine(model_dir, 4, CONTEXT)[0], prompts, params)


def same(got, want, logprob_atol=1e-4):
    for have, expected in zip(got, want, strict=True):
        assert have.token_ids == expected.token_ids
        assert have.finish_reason == expected.finish_reason
        if expected.logprobs is not None:
            np.testing.assert_allclose(have.logprobs, expected.logprobs, atol=logprob_atol)


def test_paged_equals_contiguous_and_hf(model_dir, workload, contiguous):
    prompts, params = workload
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    assert isinstance(engine, Engine)
    got = generate(engine, prompts, params)
    same(got, contiguous)
    hf = hf_model(model_dir)
    for ids, p, completion in zip(prompts, params, got):
        if p.temperature == 0 and p.repetition_penalty == 1.0:
            expected, margin = hf_greedy(hf, ids, p.max_tokens)
            assert margin > 1e-3
            assert completion.token_ids == expected
    assert engine.pool.used == 0 and engine.pool.available == engine.num_pages


def test_prompts_prefilled_one_token_a_step_give_what_chunks_give(model_dir, workload, contiguous):
    """`max_chunk=1` (what `rsdjax generate` uses for short prompts): every prompt token is a decode row of
    its own step, through the decode program only, with the same outputs, logprobs and sampling."""
    prompts, params = workload
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED, max_chunk=1)[0]
    assert engine.chunk_sizes == (1,) and {w for _, w, _ in engine.shapes_for(LENGTHS, 24)} == {1}
    same(generate(engine, prompts, params), contiguous)
    assert engine.pool.used == 0


@pytest.mark.parametrize("mesh", [None, "data=2,tensor=2"])
def test_attention_over_blocks_of_pages_equals_contiguous(model_dir, workload, contiguous, mesh):
    """Pages of 4 tokens: a row's table (32 pages) is wider than one block of `BLOCK_PAGES`, so every
    step attends in the loop over blocks (rsdjax/infer/paged_attention.py), sharded too."""
    from rsdjax.infer.paged_attention import BLOCK_PAGES

    prompts, params = workload
    engine = shared_engine(model_dir, 4, CONTEXT, mesh=mesh, **{**PAGED, "page_size": 4, "num_pages": 128})[0]
    assert min(engine.attend_pages) > BLOCK_PAGES
    same(generate(engine, prompts, params), contiguous)


def test_paged_on_a_data_2_tensor_2_mesh_equals_one_device(model_dir, workload, contiguous):
    prompts, params = workload
    engine = shared_engine(model_dir, 4, CONTEXT, mesh="data=2,tensor=2", **PAGED)[0]
    assert tuple(engine._pools.k[0].sharding.spec) == (None, None, "tensor")  # kv heads over tensor, pages whole
    assert engine.batch_sizes == (2, 4)  # decode rows split over data
    same(generate(engine, prompts, params), contiguous)


def test_prefix_cache_hit_gives_what_a_miss_gives(model_dir):
    rng = np.random.default_rng(1)
    system = rng.integers(3, 512, 37).tolist()  # 4 full pages of 8, then a partial one
    prompts = [system + rng.integers(3, 512, n).tolist() for n in (2, 7, 11, 4)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    cold = shared_engine(model_dir, 4, CONTEXT, **PAGED, prefix_caching=False)[0]
    miss = generate(cold, prompts, params)
    assert cold.stats()["prefix_cache_hits"] == 0
    warm = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    warm.pool.reset_prefix_cache()
    generate(warm, prompts[:1], params)  # caches the system prompt's pages
    before = warm.stats()
    hit = generate(warm, prompts, params)
    stats = warm.stats()
    assert stats["prefix_cache_hits"] - before["prefix_cache_hits"] >= 4 * 32  # every prompt found 4 pages
    same(hit, miss)


def test_prompts_arriving_with_one_prefix_wait_for_its_pages_and_hit_them(model_dir):
    """Three 45-token prompts with a 40-token prefix arrive together; chunks are 16 tokens and only one
    prompt a step runs a chunk that does not finish it. The two that wait look the cache up again when
    they run (as vLLM's scheduler does), so they find the pages the first one filled meanwhile instead
    of prefilling the prefix again."""
    rng = np.random.default_rng(2)
    system = rng.integers(3, 512, 40).tolist()
    prompts = [system + rng.integers(3, 512, 5).tolist() for _ in range(3)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    options = dict(PAGED, max_step_tokens=64, max_chunk=16)
    miss = generate(shared_engine(model_dir, 4, CONTEXT, **options, prefix_caching=False)[0], prompts, params)
    engine = shared_engine(model_dir, 4, CONTEXT, **options)[0]
    assert engine.chunk_sizes == (16,)
    engine.pool.reset_prefix_cache()
    before = engine.stats()
    same(generate(engine, prompts, params), miss)
    stats = engine.stats()
    # the first prompt's first two chunks filled 4 pages of 8 before the others ran; each found them
    assert stats["prefix_cache_hits"] - before["prefix_cache_hits"] == 2 * 32
    assert stats["prefix_cache_queries"] - before["prefix_cache_queries"] == 3 * 45
    assert engine.pool.used == 0


def test_a_cache_too_small_for_the_load_evicts_and_preempts_yet_outputs_are_identical(model_dir, workload,
                                                                                      contiguous):
    """12 pages of 8 tokens for 4 slots of up to 65 tokens. The host allocator is what limits the pages
    (the device pool keeps its size, so the compiled steps are shared with the other tests)."""
    prompts, params = workload
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    full = engine.pool, engine.num_pages
    engine.pool, engine.num_pages = PagePool(12, 8), 12
    try:
        got = generate(engine, prompts, params)
        assert engine.stats()["preemptions"] > 0
        same(got, contiguous)
        assert engine.pool.used == 0
        with pytest.raises(PromptTooLongError, match="exceeds the context of 96 tokens"):  # 12 pages x 8
            engine.prefill(Request("big", [5] * 90, SamplingParams(max_tokens=10)))
    finally:
        engine.pool, engine.num_pages = full


def test_no_page_leaks_after_200_requests(model_dir):
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 512, int(n)).tolist() for n in rng.integers(1, 20, 200)]
    params = [SamplingParams(max_tokens=int(m), temperature=0.0, ignore_eos=True) for m in rng.integers(1, 6, 200)]
    out = generate(engine, prompts, params)
    assert [len(c.token_ids) for c in out] == [p.max_tokens for p in params]
    assert engine.pool.used == 0 and engine.pool.available == engine.num_pages
    assert int(engine.pool.refs.sum()) == 0 and engine.free_slots() == [0, 1, 2, 3]
    # a sequence freed mid-generation (client gone) gives its pages back at once
    engine.insert(engine.prefill(Request("gone", prompts[0] * 3, params[0])), 0)
    engine.generate()
    assert engine.pool.used > 0
    engine.free(0)
    assert engine.pool.used == 0


def test_bad_requests_are_refused_with_the_reason(model_dir):
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    with pytest.raises(PromptTooLongError, match="exceeds the context of 128 tokens"):
        engine.prefill(Request("long", [5] * 120, SamplingParams(max_tokens=10)))
    with pytest.raises(ValueError, match="token id 1000000 outside the vocabulary"):
        engine.prefill(Request("bad", [10**6], SamplingParams()))
    with pytest.raises(ValueError, match="adapter entry 1, but the engine has no adapter pool"):
        engine.prefill(Request("adapter", [5, 6], SamplingParams(), adapter=1))


def test_steps_run_in_the_smallest_compiled_shape_that_holds_them(model_dir):
    """Rows finishing one by one, and shorter prompts after a longer one, compile nothing new (a compile
    costs seconds, a padded step milliseconds); after warm-up each step runs in its smallest shape."""
    from rsdjax.infer.engine import load_engine

    engine, _ = load_engine(model_dir, max_slots=4, max_context=CONTEXT, **PAGED)
    long = generate(engine, [list(range(3, 33))], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert {s[:3] for s in engine._compiled} == {(1, 32, 16), (1, 1, 16)}  # a 32-token chunk, 1 decode row
    prompts = [list(range(3, 3 + n)) for n in (14, 9, 5, 3)]  # one step of chunks (32 tokens), then 4 rows
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (4, 8, 12, 16)]
    first = generate(engine, prompts, params)
    # the short prompts ran together, as 4 rows of a 16-token chunk (one call), then 2 decode rows in the
    # compiled 4, the last row alone
    assert {s[:3] for s in engine._compiled} == {(1, 32, 16), (1, 1, 16), (4, 16, 16), (4, 1, 16)}
    assert engine._step_shape(2, 1, 1, False) == (4, 1, 16) and engine._step_shape(1, 9, 1, False) == (1, 32, 16)
    assert engine._step_shape(3, 9, 1, False) == (4, 16, 16)

    engine.warmup()  # every shape compiled: each step in the smallest that holds it
    assert engine._step_shape(2, 1, 1, False) == (2, 1, 16) and engine._step_shape(1, 9, 1, False) == (1, 16, 16)
    assert engine._step_shape(3, 1, 2, False) == (4, 1, 16) and engine._step_shape(2, 20, 1, False) == (2, 32, 16)
    same(generate(engine, [list(range(3, 33))], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)), long)
    same(generate(engine, prompts, params), first)  # the same tokens in the smallest shapes


def test_warmup_compiles_every_shape(model_dir):
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    assert engine.batch_sizes == (1, 2, 4) and engine.chunk_sizes == (16, 32)
    before = engine._steps.forward.cache_size(), engine._steps.sample.cache_size()
    pools = [np.asarray(a).copy() for a in engine._pools.k + engine._pools.v]
    shapes = engine.warmup()
    # every shape ran once per attention branch (reaching each gather width), writing no page
    for was, now in zip(pools, engine._pools.k + engine._pools.v, strict=True):
        np.testing.assert_array_equal(np.asarray(now), was)
    # decode at 1, 2, 4 rows; prompt chunks 16 and 32 wide, each at 1, 2, 4 rows
    assert shapes == len(engine.shapes()) == 9 * len(engine.attend_pages)
    # logprobs are runtime branches, not shapes; sampling is compiled once per row count, not per shape
    assert engine._steps.forward.cache_size() - before[0] <= shapes
    assert engine._steps.sample.cache_size() - before[1] <= len(engine.batch_sizes)
    assert engine.pool.used == 0


def test_a_step_prefills_every_waiting_prompt_within_its_budget_one_chunk_each(model_dir, workload, contiguous,
                                                                                 monkeypatch):
    """The default budget is vLLM's on CPU (2,048 tokens): prompts that arrive together are prefilled in
    the same step, each by at most one chunk of MAX_CHUNK tokens (lowered to 16 here), and only one
    prompt a step by a chunk that does not finish it (the 41-token prompt waits while the 30-token one
    runs its first chunk)."""
    from rsdjax.cli.common import DEFAULT_STEP_TOKENS
    from rsdjax.infer import paged_engine
    from rsdjax.infer.engine import load_engine

    assert paged_engine.DEFAULT_STEP_TOKENS == DEFAULT_STEP_TOKENS  # `rsdjax serve`'s default is the engine's
    monkeypatch.setattr(paged_engine, "MAX_CHUNK", 16)
    engine = load_engine(model_dir, max_slots=4, max_context=CONTEXT, kind="paged", page_size=8, num_pages=64)[0]
    assert engine.max_step_tokens == DEFAULT_STEP_TOKENS and engine.chunk_sizes == (16,)
    prompts, params = workload
    picked = [4, 6, 5, 7]  # 30, 41, 12 and 5 tokens
    for slot, i in enumerate(picked):
        engine.insert(engine.prefill(Request(str(i), prompts[i], params[i])), slot)
    assert sorted(e.slot for e in engine.generate()) == [2, 3]
    assert [s.computed for s in engine._seqs] == [16, 0, 12, 5]
    assert sorted(e.slot for e in engine.generate()) == [0, 2, 3]  # decodes, the 30's last 14, the 41's first 16
    assert [s.computed for s in engine._seqs] == [30, 16, 13, 6]
    for slot in range(4):
        engine.free(slot)
    same(generate(engine, [prompts[i] for i in picked], [params[i] for i in picked]), [contiguous[i] for i in picked])


def test_a_prompt_whose_rest_fits_its_chunk_width_finishes_in_that_chunk(model_dir, workload):
    """With one row decoding, a budget of 32 leaves 31 tokens for a 32-token prompt. Its chunk runs 32
    wide either way (chunk sizes 16, 32), so it takes all 32 rather than leave one token for a call of
    its own in the next step (a whole pass over the weights, ~30 ms a step for SmolLM2 on 2 cores)."""
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    assert engine.max_step_tokens == 32 and engine.chunk_sizes == (16, 32)
    prompts, params = workload
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 512, 32).tolist()
    engine.insert(engine.prefill(Request("short", prompts[0], params[0])), 0)
    engine.generate()  # its prompt, then it decodes
    assert engine._seqs[0].decoding
    engine.insert(engine.prefill(Request("32", prompt, params[0])), 1)
    events = engine.generate()
    assert sorted(e.slot for e in events) == [0, 1] and engine._seqs[1].computed == 32
    for slot in range(2):
        engine.free(slot)
    want = generate(shared_engine(model_dir, 4, CONTEXT)[0], [prompts[0], prompt], [params[0]] * 2)
    same(generate(engine, [prompts[0], prompt], [params[0]] * 2), want)
    assert engine.pool.used == 0


def test_a_generation_compiles_only_the_shapes_its_prompts_reach(model_dir, workload, contiguous):
    """What `rsdjax generate` warms up: decode at its row count and its widest prompt chunk, at each
    attended-page bucket it reaches; every step of the generation then runs in one of them."""
    engine = shared_engine(model_dir, 4, CONTEXT, **dict(PAGED, max_step_tokens=64))[0]
    prompts, params = workload
    picked = [0, 1, 3]  # 3, 9 and 6 tokens, up to 24 new: three 16-token chunks in one call, three decode rows
    shapes = engine.shapes_for([len(prompts[i]) for i in picked], 24)
    assert shapes == [(4, 1, a) for a in engine.attend_pages] + [(4, 16, a) for a in engine.attend_pages]
    assert len(shapes) < len(engine.shapes())
    before = engine._steps.forward.cache_size()
    engine.warmup(shapes)
    warmed = engine._steps.forward.cache_size()
    same(generate(engine, [prompts[i] for i in picked], [params[i] for i in picked]), [contiguous[i] for i in picked])
    assert {s[:3] for s in engine._compiled} == set(shapes)  # every step ran in a warmed shape
    assert engine._steps.forward.cache_size() == warmed <= before + len(shapes)  # nothing compiled mid-stream


def test_prompt_chunks_of_one_width_share_a_call(model_dir, workload, contiguous, monkeypatch):
    """Prompts that arrive together run as the rows of one call per chunk width (the weights streamed
    once), each row at its own positions and pages, sampled as when each ran alone."""
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    prompts, params = workload
    picked = [0, 1, 3, 5]  # 3, 9, 6 and 12 tokens: 16 wide, 30 tokens of the step's budget of 32
    calls = []
    run = engine._run
    monkeypatch.setattr(engine, "_run", lambda seqs, lengths, chunk=False: calls.append(
        (chunk, [s.slot for s in seqs], lengths)) or run(seqs, lengths, chunk))
    for slot, i in enumerate(picked):
        engine.insert(engine.prefill(Request(str(i), prompts[i], params[i])), slot)
    assert sorted(e.slot for e in engine.generate()) == [0, 1, 2, 3]
    assert calls == [(True, [0, 1, 2, 3], [3, 9, 6, 12])]
    for slot in range(4):
        engine.free(slot)
    monkeypatch.undo()
    same(generate(engine, [prompts[i] for i in picked], [params[i] for i in picked]),
         [contiguous[i] for i in picked])
    assert engine.pool.used == 0
