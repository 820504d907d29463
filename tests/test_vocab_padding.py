"""A vocabulary the tensor axis does not divide (517 on tensor=2/4/8) is padded on load, as vLLM pads:
padded ids get -inf logits, are never sampled, and exports strip them."""
import json

import numpy as np
import pytest

from conftest import make_hf_llama, max_abs

VOCAB = 517


@pytest.fixture(scope="module")
def odd_vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab517")
    make_hf_llama(path, seed=3, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="module")
def one_device_logits(odd_vocab_dir):
    from rsdjax.loading import load_model

    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)
    return tokens, np.asarray(load_model(odd_vocab_dir)(tokens))


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_odd_vocab_loads_on_tensor_meshes(odd_vocab_dir, one_device_logits, tensor):
    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh

    tokens, want = one_device_logits
    model = load_model(odd_vocab_dir, mesh=make_mesh({"tensor": tensor}))
    assert model.cfg.vocab_size % tensor == 0 and model.cfg.real_vocab_size == VOCAB
    got = np.asarray(model(tokens))
    assert got.shape[-1] == model.cfg.vocab_size
    assert max_abs(got[..., :VOCAB], want) <= 1e-5
    assert np.all(np.isneginf(got[..., VOCAB:]))


@pytest.mark.slow
def test_padded_ids_never_sampled_and_export_strips_them(odd_vocab_dir, tmp_path):
    from rsdjax.checkpoint.hf import save_hf
    from rsdjax.infer.engine import SlotEngine
    from rsdjax.infer.generate import generate
    from rsdjax.infer.interface import SamplingParams
    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh

    mesh = make_mesh({"tensor": 8})
    model = load_model(odd_vocab_dir, mesh=mesh)
    assert model.cfg.vocab_size == 520
    engine = SlotEngine(model, max_slots=4, max_context=256, eos_token_ids=[], mesh=mesh)
    # temperature 2 flattens the distribution: the 3 padded ids would be hit if they had any mass
    params = [SamplingParams(max_tokens=250, temperature=2.0, seed=s, ignore_eos=True) for s in range(4)]
    done = generate(engine, [[1, 5, 9]] * 4, params)
    sampled = [t for c in done for t in c.token_ids]
    assert len(sampled) == 1000 and max(sampled) < VOCAB and len(set(sampled)) > 200
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 517\)"):
        generate(engine, [[1, VOCAB + 1]], SamplingParams(max_tokens=2))
    out = save_hf(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB
    import torch
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(odd_vocab_dir, dtype=torch.float32)
    back = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
