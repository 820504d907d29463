"""The explicit shard_map tensor-parallel path equals the compiler-partitioned path (and one device).

tensor=4 splits the tiny model's 4 KV heads; tensor=8 does not, so K/V weights are replicated and each
device picks the KV head its query heads use. The HLO of the shard_map path has exactly one all-reduce
per block (two per layer) inside the layer loop.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rsdjax.config import ConfigError, apply_overrides, load_model_config
from rsdjax.model.llama import KVCache, Llama
from rsdjax.parallel import layer_stack
from rsdjax.parallel.mesh import make_mesh
from rsdjax.parallel.rules import INFER_RULES, TRAIN_RULES, activation_sharding
from rsdjax.parallel.sharding import create_sharded
from rsdjax.parallel.tensor_parallel import TensorParallelHooks, without_axes
from rsdjax.plan import hlo
from conftest import loss_and_grad, max_abs

BATCH, PROMPT, CACHE = 4, 10, 16


@pytest.fixture(scope="module")
def cfg():
    return load_model_config("tiny", ["param_dtype=float32", "dtype=float32"])


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(3), (BATCH, PROMPT + 1), 0, 512, dtype=jnp.int32)


def compiled_and_output(cfg, mesh_shape, fn, rules, args):
    mesh = make_mesh(mesh_shape)
    graphdef, state = nnx.split(create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh, rules))
    with jax.set_mesh(mesh):
        jitted = jax.jit(lambda p, *a: fn(graphdef, p, mesh, *a))
        compiled = jitted.lower(state.to_pure_dict(), *args).compile()
        return compiled, jax.device_get(compiled(state.to_pure_dict(), *args))


def decode_fn(graphdef, params, mesh, tokens):
    model = nnx.merge(graphdef, params)
    cache = KVCache.zeros(model.cfg, BATCH, CACHE)
    pos = jnp.broadcast_to(jnp.arange(PROMPT, dtype=jnp.int32), (BATCH, PROMPT))
    with activation_sharding(mesh, INFER_RULES):
        first, cache = model(tokens[:, :PROMPT], pos, cache=cache)
        second, cache = model(tokens[:, PROMPT:], pos[:, -1:] + 1, cache=cache)
    return first, second, cache.k


def forward_fn(graphdef, params, mesh, tokens):
    with activation_sharding(mesh, INFER_RULES):
        return nnx.merge(graphdef, params)(tokens)


def grads_fn(graphdef, params, mesh, tokens):
    return loss_and_grad(graphdef, params, tokens, mesh)


def _both_paths(cfg, mesh_shape, fn, rules, tokens):
    outs = {}
    for path in ("compiler", "shard_map"):
        outs[path] = compiled_and_output(apply_overrides(cfg, [f"tensor_parallel={path}"]), mesh_shape, fn, rules,
                                         (tokens,))
    return outs


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "tensor": 4}, {"tensor": 8}], ids=["kv-split", "kv-replicated"])
def test_shard_map_forward_equals_compiler_path(cfg, tokens, mesh_shape):
    outs = _both_paths(cfg, mesh_shape, forward_fn, "infer", tokens)
    single = jax.jit(lambda t: Llama(cfg, rngs=nnx.Rngs(0))(t))(tokens)
    assert max_abs(outs["shard_map"][1], outs["compiler"][1]) < 1e-5
    assert max_abs(outs["shard_map"][1], single) < 1e-5
    # one psum per block: two all-reduces per layer in the layer loop, run once per layer
    layer_reduces = [c for c in hlo.collectives(outs["shard_map"][0].as_text())
                     if c.op == "all-reduce" and c.loop_depth == 1]
    assert len(layer_reduces) == 2 and all(c.runs == cfg.num_layers for c in layer_reduces)
    assert all(c.group == mesh_shape["tensor"] for c in layer_reduces)


def test_shard_map_decode_equals_compiler_path(cfg, tokens):
    outs = {}
    for path in ("compiler", "shard_map"):
        c = apply_overrides(cfg, [f"tensor_parallel={path}"])
        outs[path] = compiled_and_output(c, {"data": 2, "tensor": 4}, decode_fn, "infer", (tokens,))[1]
    for a, b in zip(outs["shard_map"], outs["compiler"]):
        assert max_abs(a, b) < 1e-5


def test_shard_map_gradients_equal_compiler_path(cfg, tokens):
    outs = _both_paths(cfg, {"data": 2, "tensor": 4}, grads_fn, "train", tokens)
    (loss_a, grads_a), (loss_b, grads_b) = outs["shard_map"][1], outs["compiler"][1]
    assert abs(float(loss_a) - float(loss_b)) < 1e-6
    for name in grads_b:
        assert max_abs(grads_a[name], grads_b[name]) <= 1e-4 * np.abs(grads_b[name]).max() + 1e-7, name


def test_shard_map_inside_the_pipeline(cfg, tokens):
    """stage=2 x tensor=4, both manual: the pipelined, explicitly tensor-parallel forward and decode."""
    c4 = apply_overrides(cfg, ["num_layers=4"])
    single = jax.jit(lambda t: Llama(c4, rngs=nnx.Rngs(0))(t))(tokens)
    compiled, out = compiled_and_output(apply_overrides(c4, ["tensor_parallel=shard_map"]), {"stage": 2, "tensor": 4},
                                        forward_fn, "infer", (tokens,))
    assert max_abs(out, single) < 1e-5
    ops = {c.op for c in hlo.collectives(compiled.as_text()) if c.loop_depth >= 1}
    assert {"all-reduce", "collective-permute"} <= ops


def test_without_a_mesh_the_plain_scan_runs(cfg, tokens):
    """A config saved with tensor_parallel=shard_map still runs on one device (no tensor axis to split)."""
    c = apply_overrides(cfg, ["tensor_parallel=shard_map"])
    assert layer_stack.custom_runner(c) is None
    mesh = make_mesh({"tensor": 2})
    with activation_sharding(mesh, INFER_RULES):
        assert layer_stack.custom_runner(c).manual == {"tensor"}
        assert layer_stack.custom_runner(cfg) is None  # compiler path: XLA partitions the plain scan


def test_hooks_pick_the_kv_head_of_each_query_group():
    # 8 query heads, 4 KV heads, tensor=8: device i holds query head i, which uses KV head i // 2
    hooks = TensorParallelHooks(size=8, num_heads=8, num_kv_heads=4, kv_sharded=False)
    k = jnp.arange(4, dtype=jnp.float32).reshape(1, 1, 4, 1) * jnp.ones((2, 3, 4, 5))
    picked = jax.vmap(lambda _: hooks.select_kv_heads(k, k)[0], axis_name="tensor")(jnp.arange(8))
    assert picked.shape == (8, 2, 3, 1, 5)
    assert [float(picked[i, 0, 0, 0, 0]) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ConfigError, match="query heads"):
        TensorParallelHooks(size=3, num_heads=8, num_kv_heads=4, kv_sharded=False)


def test_without_axes_strikes_manual_axes_from_rules():
    rules = (("batch", ("data", "fsdp")), ("act_heads", "tensor"), ("kv_heads", None))
    assert without_axes(rules, {"tensor"}) == (("batch", ("data", "fsdp")), ("act_heads", None), ("kv_heads", None))
    assert without_axes(rules, {"data"})[0] == ("batch", "fsdp")


def test_bfloat16_pipeline_with_shard_map(cfg, tokens):
    """bf16 compute through both psums (row-parallel and the pipeline's last-stage broadcast). XLA:CPU
    cannot compile a bf16 all-reduce inside a partially manual shard_map; tensor_parallel.psum sums in f32."""
    c = apply_overrides(cfg, ["num_layers=4", "dtype=bfloat16"])
    single = jax.jit(lambda t: Llama(c, rngs=nnx.Rngs(0))(t))(tokens)
    _, out = compiled_and_output(apply_overrides(c, ["tensor_parallel=shard_map"]), {"stage": 2, "tensor": 2},
                                 forward_fn, "infer", (tokens,))
    assert max_abs(out, single) < 0.02 * float(jnp.abs(single).max())
