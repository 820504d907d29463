"""The engine on 8 virtual devices (tensor=8; data=2,tensor=4) gives what it gives on one device."""
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from infer_support import confident_hf_dir, shared_engine
from rsdjax.infer.generate import generate
from rsdjax.infer.interface import SamplingParams

PROMPT_LENGTHS = (4, 13, 21, 8)
PARAMS = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=5),
          SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=3, ignore_eos=True, logprobs=5),
          SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3, ignore_eos=True, logprobs=5),
          SamplingParams(max_tokens=16, temperature=1.5, top_k=8, seed=9, ignore_eos=True, logprobs=5)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return confident_hf_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(model_dir):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, n).tolist() for n in PROMPT_LENGTHS]
    engine, _ = shared_engine(model_dir, max_slots=4, max_context=128)
    return prompts, generate(engine, prompts, PARAMS)


@pytest.mark.parametrize("mesh, cache_spec", [
    ("tensor=8", P()),  # 4 kv heads do not divide 8: the cache is replicated (as vLLM does)
    ("data=2,tensor=4", P("data", "tensor")),  # slots over data, kv heads over tensor
])
def test_sharded_engine_equals_one_device(model_dir, reference, mesh, cache_spec):
    prompts, expected = reference
    engine, _ = shared_engine(model_dir, max_slots=4, max_context=128, mesh=mesh)
    assert engine.mesh.devices.size == 8
    assert engine._cache.k[0].sharding.spec == cache_spec
    assert engine.weights.layers[0]["wq"].sharding.spec == P(None, "tensor")  # q heads over tensor
    assert engine.weights.layout == "matmul"  # 4 slots: the MLP kernels stored [embed, mlp]
    assert engine.weights.layers[0]["w_up"].sharding.spec == P(None, "tensor")  # mlp over tensor
    got = generate(engine, prompts, PARAMS)
    for want, have in zip(expected, got):
        assert have.token_ids == want.token_ids
        np.testing.assert_allclose(have.logprobs, want.logprobs, atol=1e-4)
        for a, b in zip(have.top_logprobs, want.top_logprobs):
            assert list(a) == list(b)


def test_meshes_the_engine_cannot_use_are_refused_with_the_reason(model_dir):
    from rsdjax.infer.engine import SlotEngine
    from rsdjax.loading import load_model
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.parallel.rules import ShardingError

    # (stage > 1 is served since rsdjax/infer/staged.py: tests/test_infer_pipelined.py)
    replicas = load_model(model_dir, mesh=make_mesh({"data": 2}))
    with pytest.raises(ShardingError, match="kv cache: .*'batch', size 3.*data=2"):
        SlotEngine(replicas, max_slots=3, max_context=64)
