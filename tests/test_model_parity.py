"""Logits of our Flax NNX Llama == HF transformers LlamaForCausalLM on the same random weights (float32)."""
import numpy as np
import pytest
import torch

import rsdjax
from conftest import make_hf_llama, max_abs

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}

CASES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=8),
    "llama31_rope_scaling": dict(rope_theta=500000.0, rope_scaling=LLAMA31_ROPE),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "odd_sizes": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=200,
                      vocab_size=300),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = make_hf_llama(tmp_path, seed=1, **CASES[case])
    tokens = np.random.RandomState(0).randint(0, hf.config.vocab_size, (2, 70)).astype(np.int32)
    with torch.no_grad():
        expected = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    model = rsdjax.load_model(tmp_path)
    logits = model(tokens)
    assert logits.shape == expected.shape and logits.dtype == np.float32
    assert max_abs(logits, expected) <= 1e-4


def test_rope_scaling_is_not_a_no_op(tmp_path):
    """Guards the test above: positions past the original context must change with llama3 scaling."""
    from rsdjax.config import RopeScaling, load_model_config
    from rsdjax.model.llama import rope_inv_freq

    cfg = load_model_config("tiny")
    scaled = load_model_config("tiny", ["rope_theta=500000.0"])
    scaled.rope_scaling = RopeScaling(factor=8.0, original_max_position_embeddings=32)
    plain = rope_inv_freq(load_model_config("tiny", ["rope_theta=500000.0"]))
    assert not np.allclose(rope_inv_freq(scaled), plain)
    assert rope_inv_freq(scaled)[0] == plain[0]  # the highest frequency is untouched
    assert rope_inv_freq(cfg).dtype == np.float32
