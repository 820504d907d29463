"""Pipelined serving: the slot engine on meshes with stage > 1 (layers and their KV cache split over
stages, slots microbatched through the GPipe schedule) gives transformers' greedy tokens."""
import numpy as np
import pytest

from conftest import make_hf_llama
from infer_support import CONFIDENT_INIT, hf_model
from rsdjax.infer.engine import load_engine
from rsdjax.infer.generate import generate
from rsdjax.infer.interface import SamplingParams
from rsdjax.parallel.mesh import make_mesh, resolve_mesh_shape

PROMPTS = [[5, 17, 301, 42, 7, 9, 11], [9, 8], [100, 200, 300, 400, 5], [3], [44, 45, 46, 47, 48, 49, 50, 51, 52]]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_4_layers")
    make_hf_llama(path, seed=1, initializer_range=CONFIDENT_INIT, num_hidden_layers=4)
    return path


@pytest.fixture(scope="module")
def expected(four_layer_dir):
    import torch

    hf = hf_model(four_layer_dir)
    out = []
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
        out.append(ids[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("mesh", ["stage=2,tensor=4", "stage=4,tensor=2"])
def test_pipelined_engine_matches_transformers_greedy(four_layer_dir, expected, mesh):
    engine, _ = load_engine(four_layer_dir, mesh=make_mesh(resolve_mesh_shape(mesh)), max_slots=4, max_context=64)
    # the cache's layer dim lives on the stages, with the weights of those layers
    assert engine._cache.k.sharding.spec[0] == "stage" and engine.weights.layers["wq"].sharding.spec[0] == "stage"
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    # 5 prompts of mixed lengths over 4 slots: one waits for a slot, so slots hold different lengths
    got = [c.token_ids for c in generate(engine, PROMPTS, greedy)]
    assert got == expected
    assert np.all([len(t) == NEW_TOKENS for t in got])


@pytest.mark.parametrize("options,message", [
    ({"kind": "paged"}, "layers are sharded over 'stage'"),
    ({"quantize": "int8"}, "--quantize int8 is not served on a mesh with stage > 1"),
    ({"max_loras": 1}, "per-request LoRA adapters are not served on a mesh with stage > 1"),
])
def test_engine_refuses_what_it_does_not_pipeline_when_loading(four_layer_dir, options, message):
    """What `--hardware` keeps on stage=1 (cli.common.pipeline_refusal) is what the engine refuses on stages:
    refused when the engine is built, in words, not at the first request."""
    with pytest.raises(ValueError, match=message):
        load_engine(four_layer_dir, mesh=make_mesh(resolve_mesh_shape("stage=2,tensor=4")), max_slots=4,
                    max_context=64, **options)
