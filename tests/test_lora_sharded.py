"""Sharded LoRA (tensor=8; fsdp=2,tensor=4) equals one device: forward, training steps, placement."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_abs
from rsdjax.loading import load_model
from rsdjax.model.lora import IN_DIMS, LoRAParam, LoraConfig, attach_lora
from rsdjax.parallel.mesh import make_mesh
from rsdjax.parallel.rules import TRAIN_RULES, activation_sharding
from rsdjax.parallel.sharding import state_shardings
from rsdjax.sft import sft_loss
from rsdjax.train.config import OptimConfig
from rsdjax.train.optimizer import make_optimizer
from rsdjax.train.step import TrainStep

CONFIG = LoraConfig(r=8, alpha=16, dropout=0.1, target_modules="all-linear")
STEPS = 3


def fixed_batches(n=STEPS, b=8, t=32):
    """Random token rows, each packed with two examples (segments), loss on a random half."""
    rng = np.random.default_rng(7)
    seg = np.where(np.arange(t) < 20, 1, 2)[None].repeat(b, 0).astype(np.int32)
    pos = np.concatenate([np.arange(20), np.arange(t - 20)])[None].repeat(b, 0).astype(np.int32)
    return [{"tokens": rng.integers(0, 512, (b, t)).astype(np.int32),
             "targets": rng.integers(0, 512, (b, t)).astype(np.int32),
             "loss_mask": rng.random((b, t)) < 0.5, "segment_ids": seg, "positions": pos} for _ in range(n)]


def run(tiny_hf_dir, mesh_shape):
    mesh = make_mesh(mesh_shape)
    model = attach_lora(load_model(tiny_hf_dir, mesh=mesh, rules="train"), CONFIG, seed=0)
    rng = np.random.default_rng(11)
    for k in sorted(model.lora.layers):  # non-zero B, so the forward pass exercises the adapter
        b = model.lora.b[k]
        b[...] = jax.device_put(rng.normal(0, 0.05, b.shape).astype(np.float32), b[...].sharding)
    model.eval()
    with activation_sharding(mesh, TRAIN_RULES):
        logits = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(fixed_batches(1)[0]["tokens"]))
    # Adam moves every weight by ~lr per step whatever its gradient's size: a small lr keeps the float
    # noise of a different reduction order (one device vs sharded) below the tolerance
    tx, _ = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.0, b2=0.999), STEPS)
    model.train()  # dropout on: the keys must not depend on the mesh
    step = TrainStep(model, tx, mesh, trainable=LoRAParam, loss_fn=sft_loss)
    params, frozen = step.split(model)
    state, losses = step.init(params), []
    for batch in fixed_batches():
        state, metrics = step(state, frozen, {k: jax.device_put(v, step.batch_sharding) for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    return step.merge(state.params, frozen), mesh, state, np.asarray(logits), losses


def spec(x) -> tuple:
    """An array's PartitionSpec with one entry per dimension."""
    return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


@pytest.fixture(scope="module")
def one_device(tiny_hf_dir):
    model, _, _, logits, losses = run(tiny_hf_dir, {})
    return logits, losses, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, LoRAParam)))


@pytest.mark.parametrize("mesh_shape", [{"tensor": 8}, {"fsdp": 2, "tensor": 4}], ids=["tensor8", "fsdp2-tensor4"])
def test_sharded_lora_equals_one_device(tiny_hf_dir, one_device, mesh_shape):
    ref_logits, ref_losses, ref_lora = one_device
    model, mesh, state, logits, losses = run(tiny_hf_dir, mesh_shape)
    assert max_abs(logits, ref_logits) <= 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    lora = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, LoRAParam)))
    assert max(jax.tree.leaves(jax.tree.map(max_abs, lora, ref_lora))) <= 1e-5

    # placement: what the train rules give for the LoRA logical axes, i.e. the kernel's own mesh axes
    expected = state_shardings(nnx.state(model.lora, LoRAParam), mesh, "train")
    for k in model.lora.layers:
        a, b, kernel = model.lora.a[k][...], model.lora.b[k][...], getattr(model, k)[...]
        assert a.sharding.is_equivalent_to(expected["a"][k], a.ndim)
        assert b.sharding.is_equivalent_to(expected["b"][k], b.ndim)
        n_in = IN_DIMS.get(k, 1)
        assert spec(a) == (*spec(kernel)[:1 + n_in], None), k
        assert spec(b) == (spec(kernel)[0], None, *spec(kernel)[1 + n_in:]), k
    assert any(spec(model.lora.b[k][...]) != (None,) * model.lora.b[k][...].ndim for k in model.lora.layers)
    # Adam's moments sit where their parameters do
    mu = state.opt_state[1][0].mu["lora"]["b"]["wq"]
    assert mu.sharding.is_equivalent_to(model.lora.b["wq"][...].sharding, 4)
