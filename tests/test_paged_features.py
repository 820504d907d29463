"""What the paged engine serves beyond plain decoding, against the slot engine and HF: prompt logprobs
over several prompt chunks, from a prompt whose pages are cached and under preemption; structured
output (llguidance guides) giving the slot engine's sampled tokens, also when a guided request is
preempted and recomputed. (Per-request LoRA: tests/test_multi_lora.py runs both engines.)"""
import contextlib
import re

import numpy as np
import pytest
import torch

from infer_support import confident_dir_with_tokenizer, hf_model, shared_engine
from rsdjax.infer.generate import generate
from rsdjax.infer.interface import SamplingParams
from rsdjax.infer.pages import PagePool
from rsdjax.infer.structured import GrammarCompiler

CONTEXT = 128
PAGED = dict(kind="paged", page_size=8, num_pages=64, max_step_tokens=32)  # prompts over 32 tokens take 2+ chunks
LENGTHS = (3, 17, 41, 70)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_dir):
    return confident_dir_with_tokenizer(tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(4)
    return [rng.integers(3, 500, n).tolist() for n in LENGTHS]


@contextlib.contextmanager
def small_pool(engine, pages: int):
    """The host allocator limited to `pages` pages (the device pool keeps its size, so the compiled
    steps are shared); afterwards the full pool, its prefix cache dropped (those pages were rewritten)."""
    full = engine.pool, engine.num_pages
    engine.pool, engine.num_pages = PagePool(pages, engine.page_size), pages
    try:
        yield
    finally:
        engine.pool, engine.num_pages = full
        engine.pool.reset_prefix_cache()


def scored(engine, prompts, k=3, max_tokens=1):
    """Each prompt's `TokenEvent.prompt_logprobs` (max_tokens 1: scoring only, as lm-eval asks)."""
    out = {}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=k, ignore_eos=True)
    generate(engine, prompts, params, on_token=lambda i, e: out.setdefault(i, e.prompt_logprobs))
    return [out[i] for i in range(len(prompts))]


def assert_same_scores(got, want):
    for have, expected in zip(got, want, strict=True):
        assert have[0] is None and expected[0] is None and len(have) == len(expected)
        for (lp, top, rank), (lp_w, top_w, rank_w) in zip(have[1:], expected[1:]):
            assert lp == pytest.approx(lp_w, abs=1e-4) and rank == rank_w
            assert top.keys() == top_w.keys()
            np.testing.assert_allclose([top[t] for t in top_w], list(top_w.values()), atol=1e-4)


@pytest.fixture(scope="module")
def slot_scores(model_dir, prompts):
    return scored(shared_engine(model_dir, 4, CONTEXT)[0], prompts)


def test_prompt_logprobs_over_chunks_equal_the_slot_engine_and_hf(model_dir, prompts, slot_scores):
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    got = scored(engine, prompts)
    assert_same_scores(got, slot_scores)
    hf = hf_model(model_dir)
    for ids, entries in zip(prompts, got):
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
        want = [logprobs[t - 1, ids[t]] for t in range(1, len(ids))]
        np.testing.assert_allclose([e[0] for e in entries[1:]], want, atol=1e-4)
    assert engine.pool.used == 0


def test_prompt_logprobs_of_a_cached_prompt_and_under_preemption(model_dir, prompts, slot_scores):
    """A scored prompt runs every position even when its pages are cached (they were never scored);
    a cache too small for the load preempts (decoding sequences take the pages of newer ones still
    in their prompts), and the recomputed prompts score the same."""
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    generate(engine, prompts, SamplingParams(max_tokens=2, temperature=0.0))  # caches every prompt's pages
    assert_same_scores(scored(engine, prompts), slot_scores)
    long = [p + p[:20] for p in prompts[1:]]  # 37..90 tokens (+ 6 generated), all at once, in 12 pages of 8
    want = scored(shared_engine(model_dir, 4, CONTEXT)[0], long, max_tokens=6)
    with small_pool(engine, 12):
        before = engine.preemptions
        got = scored(engine, long, max_tokens=6)
        assert engine.preemptions > before
        assert_same_scores(got, want)
        assert engine.pool.used == 0


DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"


def guided(engine, tokenizer, prompts, seeds):
    """Sampled (temperature 1) completions under the DATE regex, one fresh guide per request."""
    compiler = GrammarCompiler.for_tokenizer(tokenizer, engine.vocab_size, engine.eos_token_ids)
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=s, guide=compiler.regex(DATE)) for s in seeds]
    return generate(engine, prompts, params, tokenizer=tokenizer)


def test_structured_output_gives_the_slot_engines_samples_also_when_preempted(model_dir, prompts):
    slots, tokenizer = shared_engine(model_dir, 4, CONTEXT)
    seeds = range(len(prompts) * 2)
    batch = prompts * 2
    want = guided(slots, tokenizer, batch, seeds)
    assert all(re.fullmatch(DATE, c.text) and c.finish_reason == "stop" for c in want), [c.text for c in want]
    assert len({c.text for c in want}) > 1  # sampled, not one answer
    engine = shared_engine(model_dir, 4, CONTEXT, **PAGED)[0]
    assert [c.token_ids for c in guided(engine, tokenizer, batch, seeds)] == [c.token_ids for c in want]
    with small_pool(engine, 12):  # 4 sequences of up to 94 tokens in 96 positions
        before = engine.preemptions
        got = guided(engine, tokenizer, batch, seeds)
        assert engine.preemptions > before
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
