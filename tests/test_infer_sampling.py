"""Sampling, one row per slot with its own settings, against HF's logits processors and the softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                     TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from rsdjax.infer.interface import SamplingParams
from rsdjax.infer.sampling import SamplingArrays, apply_penalties, filter_logits, keys_from_seeds, sample

ROWS = [  # temperature, top_k, top_p, min_p
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=7),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.6, min_p=0.05),
]


def hf_filtered(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    x = torch.tensor(logits[None])
    ids = torch.zeros((1, 1), dtype=torch.long)
    x = TemperatureLogitsWarper(p.temperature)(ids, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p:
        x = MinPLogitsWarper(p.min_p)(ids, x)
    return x[0].numpy()


def test_filters_match_hf_warpers_row_by_row():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((len(ROWS), 64)) * 3).astype(np.float32)
    ours = np.asarray(jax.jit(filter_logits)(jnp.asarray(logits), SamplingArrays.from_params(ROWS)))
    for i, p in enumerate(ROWS):
        ref = hf_filtered(logits[i], p)
        kept = np.isfinite(ref)
        assert 0 < kept.sum() < 64 or i == 0
        np.testing.assert_array_equal(np.isfinite(ours[i]), kept, err_msg=f"row {i}: {p}")
        np.testing.assert_allclose(ours[i][kept], ref[kept], rtol=1e-6)


def test_repetition_penalty_matches_hf_and_presence_frequency_follow_openai():
    rng = np.random.default_rng(1)
    vocab = 32
    logits = (rng.standard_normal((2, vocab)) * 2).astype(np.float32)
    prompt = [[1, 5, 5, 9], [2, 3]]
    output = [[9, 9, 4], [7]]
    prompt_mask = np.zeros((2, vocab), bool)
    counts = np.zeros((2, vocab), np.int32)
    for i in range(2):
        prompt_mask[i, prompt[i]] = True
        np.add.at(counts[i], output[i], 1)
    rows = [SamplingParams(repetition_penalty=1.7), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    ours = np.asarray(apply_penalties(jnp.asarray(logits), SamplingArrays.from_params(rows),
                                      jnp.asarray(prompt_mask), jnp.asarray(counts)))
    seen = torch.tensor([prompt[0] + output[0]])
    ref0 = RepetitionPenaltyLogitsProcessor(1.7)(seen, torch.tensor(logits[:1]))[0].numpy()
    np.testing.assert_allclose(ours[0], ref0, rtol=1e-6)
    # OpenAI: mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty
    ref1 = logits[1] - counts[1] * 0.25 - (counts[1] > 0) * 0.5
    np.testing.assert_allclose(ours[1], ref1, rtol=1e-6)


def test_draws_follow_the_filtered_softmax():
    """4000 draws per row (one per step counter): frequencies match the filtered distribution."""
    vocab, draws = 8, 4000
    logits = jnp.asarray(np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.04, 0.01], np.float32)))
    rows = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_p=0.6, seed=2),
            SamplingParams(temperature=2.0, top_k=3, seed=3)]
    sp = SamplingArrays.from_params(rows)
    keys = keys_from_seeds(jnp.array([[p.seed, 0] for p in rows], jnp.uint32))
    zeros = (jnp.zeros((3, vocab), bool), jnp.zeros((3, vocab), jnp.int32))

    @jax.jit
    def many(step_ids):
        one = lambda s: sample(jnp.broadcast_to(logits, (3, vocab)), sp, keys, jnp.full(3, s), *zeros)  # noqa: E731
        return jax.vmap(one)(step_ids)

    tokens = np.asarray(many(jnp.arange(draws)))  # [draws, 3]
    for i, p in enumerate(rows):
        expected = np.exp(np.asarray(filter_logits(jnp.broadcast_to(logits, (3, vocab)), sp))[i])
        expected /= expected.sum()
        freq = np.bincount(tokens[:, i], minlength=vocab) / draws
        assert np.all(freq[expected == 0] == 0), f"row {i} drew a filtered token"
        assert np.abs(freq - expected).max() < 0.03, f"row {i}: {freq} vs {expected}"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_greedy_rows_are_argmax_whatever_the_other_rows_do(temperature):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((3, 50)).astype(np.float32))
    rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=temperature, top_p=0.5, seed=4),
            SamplingParams(temperature=0.0, top_k=3)]
    keys = keys_from_seeds(jnp.array([[0, 0], [4, 0], [0, 0]], jnp.uint32))
    out = np.asarray(sample(logits, SamplingArrays.from_params(rows), keys, jnp.zeros(3, jnp.int32),
                            jnp.zeros((3, 50), bool), jnp.zeros((3, 50), jnp.int32)))
    argmax = np.asarray(jnp.argmax(logits, -1))
    assert out[0] == argmax[0] and out[2] == argmax[2]
    if temperature == 0.0:
        assert out[1] == argmax[1]
