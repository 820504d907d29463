"""Layer pipelining over `stage`: forward, decode and a training step equal the single-device model.

The reference is the same parameters run by the plain scan on one device (no mesh). The pipelined
runs use stage=2 (with data=2, tensor=2) and stage=4 (with tensor=2) meshes on the 8 virtual devices.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsdjax.config import ConfigError, apply_overrides, load_model_config
from rsdjax.model.llama import KVCache, Llama
from rsdjax.parallel.mesh import make_mesh
from rsdjax.parallel.pipeline import choose_microbatches
from rsdjax.parallel.rules import INFER_RULES, TRAIN_RULES, activation_sharding
from rsdjax.parallel.sharding import create_sharded
from rsdjax.plan import hlo
from conftest import loss_and_grad, max_abs

MESHES = {"stage2": {"data": 2, "stage": 2, "tensor": 2}, "stage4": {"stage": 4, "tensor": 2}}
BATCH, PROMPT, CACHE = 8, 12, 16


@pytest.fixture(scope="module")
def cfg():
    return load_model_config("tiny", ["num_layers=4", "param_dtype=float32", "dtype=float32"])


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(7), (BATCH, PROMPT + 1), 0, 512, dtype=jnp.int32)


def run_model(cfg, mesh_shape, fn, rules):
    """Build the model (same seed) on the mesh, or on one device without a mesh, and run fn(graphdef, params)."""
    if mesh_shape is None:
        graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
        return jax.device_get(jax.jit(lambda p: fn(graphdef, p, None))(state.to_pure_dict()))
    mesh = make_mesh(mesh_shape)
    graphdef, state = nnx.split(create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh, rules))
    with jax.set_mesh(mesh):
        return jax.device_get(jax.jit(lambda p: fn(graphdef, p, mesh))(state.to_pure_dict()))


def forward(tokens, rules=INFER_RULES):
    def fn(graphdef, params, mesh):
        model = nnx.merge(graphdef, params)
        if mesh is None:
            return model(tokens)
        with activation_sharding(mesh, rules):
            return model(tokens)
    return fn


def prefill_and_decode(tokens):
    """Prefill PROMPT tokens, then decode two tokens: logits of every call and the final cache."""
    def fn(graphdef, params, mesh):
        model = nnx.merge(graphdef, params)
        cache = KVCache.zeros(model.cfg, BATCH, CACHE)
        pos = jnp.broadcast_to(jnp.arange(PROMPT, dtype=jnp.int32), (BATCH, PROMPT))
        ctx = activation_sharding(mesh, INFER_RULES) if mesh is not None else nullcontext()
        with ctx:
            first, cache = model(tokens[:, :PROMPT], pos, cache=cache)
            second, cache = model(tokens[:, PROMPT:], pos[:, -1:] + 1, cache=cache)
            third, cache = model(jnp.argmax(second, -1).astype(jnp.int32), pos[:, -1:] + 2, cache=cache)
        return first, second, third, cache.k, cache.v
    return fn


def loss_and_grads(tokens):
    def fn(graphdef, params, mesh):
        return loss_and_grad(graphdef, params, tokens, mesh)
    return fn


class nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def reference(cfg, tokens):
    """Single-device results, computed once: forward logits, prefill+decode, loss and gradients."""
    return {"forward": run_model(cfg, None, forward(tokens), INFER_RULES),
            "decode": run_model(cfg, None, prefill_and_decode(tokens), INFER_RULES),
            "train": run_model(cfg, None, loss_and_grads(tokens), TRAIN_RULES)}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_pipelined_forward_equals_single_device(cfg, tokens, reference, mesh_name):
    out = run_model(cfg, MESHES[mesh_name], forward(tokens), INFER_RULES)
    assert out.shape == (BATCH, PROMPT + 1, cfg.vocab_size)
    assert max_abs(out, reference["forward"]) < 1e-5


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_pipelined_prefill_and_decode_equal_single_device(cfg, tokens, reference, mesh_name):
    out = run_model(cfg, MESHES[mesh_name], prefill_and_decode(tokens), INFER_RULES)
    for name, a, b in zip(("prefill logits", "decode 1", "decode 2", "cache k", "cache v"), out, reference["decode"]):
        assert max_abs(a, b) < 1e-5, name
    assert np.abs(out[3]).sum() > 0  # the cache was written


@pytest.mark.parametrize("mesh_name,overrides", [("stage2", []),
                                                 ("stage4", ["remat=true", "pipeline_microbatches=2"])])
def test_pipelined_train_step_equals_single_device(cfg, tokens, reference, mesh_name, overrides):
    """Loss and every gradient of the GPipe schedule (stage=4: with recomputation and 2 microbatches)."""
    ref_loss, ref_grads = reference["train"]
    loss, grads = run_model(apply_overrides(cfg, overrides), MESHES[mesh_name], loss_and_grads(tokens), TRAIN_RULES)
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    for name in ref_grads:
        scale = np.abs(ref_grads[name]).max()
        assert max_abs(grads[name], ref_grads[name]) <= 1e-4 * scale + 1e-7, name


def _forward_collectives(cfg, mesh_shape):
    mesh = make_mesh(mesh_shape)
    graphdef, state = nnx.split(create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh, "infer"))
    toks = jnp.zeros((BATCH, PROMPT), jnp.int32)

    def f(params, toks):
        with activation_sharding(mesh, INFER_RULES):
            return nnx.merge(graphdef, params)(toks)

    with jax.set_mesh(mesh):
        return hlo.collectives(jax.jit(f).lower(state.to_pure_dict(), toks).compile().as_text())


def test_pipeline_passes_activations_not_weights(cfg):
    """Pipelined: one collective-permute per clock tick and no weight gathering. Without the pipeline
    (pipeline=false) the compiler all-gathers every stage's layers onto every device instead."""
    piped = _forward_collectives(cfg, {"stage": 4})
    permutes = [c for c in piped if c.op == "collective-permute"]
    assert len(permutes) == 1 and permutes[0].loop_depth == 1
    ticks = choose_microbatches(0, BATCH, 1, 4, cached=False) + 4 - 1
    assert permutes[0].runs == ticks
    assert not [c for c in piped if c.op == "all-gather"]
    plain = _forward_collectives(apply_overrides(cfg, ["pipeline=false"]), {"stage": 4})
    gathered = [c for c in plain if c.op == "all-gather" and c.shape.split("[")[1].startswith(f"{cfg.num_layers},")]
    assert gathered, "expected the non-pipelined program to gather stacked layer weights"


def test_choose_microbatches():
    assert choose_microbatches(0, 8, 1, 2, cached=False) == 8  # <= 4 x stages
    assert choose_microbatches(0, 64, 2, 2, cached=False) == 8  # per data shard 32 rows, cap 8
    assert choose_microbatches(0, 8, 1, 4, cached=True) == 4  # decode: S microbatches
    assert choose_microbatches(0, 6, 1, 4, cached=True) == 3
    assert choose_microbatches(0, 1, 2, 4, cached=True) == 1  # batch 1 on data=2 stays whole
    assert choose_microbatches(2, 8, 1, 4, cached=False) == 2
    with pytest.raises(ConfigError, match="does not divide"):
        choose_microbatches(3, 8, 1, 4, cached=False)
