"""The sampler under broken logits and bad settings, and what `free()` leaves on the device."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer_support import confident_hf_dir, shared_engine
from rsdjax.infer.interface import Request, SamplingParams
from rsdjax.infer.sampling import SamplingArrays, SamplingError, argmax, keys_from_seeds, sample, validate

VOCAB = 64


def test_argmax_skips_nans_like_numpy_and_stays_in_the_vocabulary():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, VOCAB)).astype(np.float32)
    logits[1, [3, 17, 40]] = np.nan  # a few NaNs: the best of the numbers still wins
    logits[2, :] = np.nan  # nothing but NaN
    logits[3, :] = -np.inf  # everything masked
    ours = np.asarray(jax.jit(argmax)(jnp.asarray(logits)))
    assert ours[0] == np.argmax(logits[0]) and ours[1] == np.nanargmax(logits[1])
    assert ours[3] == 0  # numpy's argmax of an all -inf row
    assert all(0 <= t < VOCAB for t in ours)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sample_of_an_all_nan_row_is_a_token_of_the_vocabulary(temperature):
    logits = np.random.default_rng(1).standard_normal((2, VOCAB)).astype(np.float32)
    logits[0, :] = np.nan
    params = [SamplingParams(temperature=temperature, top_p=0.9, presence_penalty=0.5)] * 2
    keys = keys_from_seeds(jnp.zeros((2, 2), jnp.uint32))
    tokens = np.asarray(jax.jit(sample)(jnp.asarray(logits), SamplingArrays.from_params(params), keys,
                                        jnp.zeros(2, jnp.int32), jnp.zeros((2, VOCAB), bool),
                                        jnp.zeros((2, VOCAB), jnp.int32)))
    assert all(0 <= t < VOCAB for t in tokens), tokens


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", float("nan"), r"presence_penalty must be in \[-2, 2\], got nan"),
    ("presence_penalty", 2.5, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    ("frequency_penalty", -3.0, r"frequency_penalty must be in \[-2, 2\], got -3.0"),
    ("frequency_penalty", float("inf"), r"frequency_penalty must be in \[-2, 2\], got inf"),
    ("temperature", float("inf"), r"temperature must be a finite number >= 0, got inf"),
    ("repetition_penalty", float("nan"), r"repetition_penalty must be a finite number > 0, got nan"),
])
def test_penalties_and_temperature_are_validated(field, value, message):
    with pytest.raises(SamplingError, match=rf"^request r7: {message}$"):
        validate(dataclasses.replace(SamplingParams(), **{field: value}), VOCAB, "request r7")


def test_free_puts_the_slots_device_sampling_settings_back_to_neutral(tmp_path_factory):
    engine = shared_engine(confident_hf_dir(tmp_path_factory), max_slots=4, max_context=128)[0]
    neutral = SamplingArrays.from_params([SamplingParams(temperature=0.0)])
    sampled = SamplingParams(max_tokens=4, temperature=0.9, top_k=5, top_p=0.8, min_p=0.1,
                             repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, seed=3)
    engine.insert(engine.prefill(Request("s", [5, 6, 7], sampled)), 1)
    assert float(engine._state.params.temperature[1]) == pytest.approx(0.9)
    engine.free(1)
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        assert np.asarray(getattr(engine._state.params, name))[1] == getattr(neutral, name)[0], name
    # the next greedy request in that slot decodes exactly as in a never-used engine's slot 0
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.insert(engine.prefill(Request("g1", [9, 8, 7, 6], greedy)), 1)
    first = [e.token_id for _ in range(5) for e in engine.generate()]
    engine.free(1)
    engine.insert(engine.prefill(Request("g2", [9, 8, 7, 6], greedy)), 0)
    again = [e.token_id for _ in range(5) for e in engine.generate()]
    engine.free(0)
    assert first == again and len(first) == 5
