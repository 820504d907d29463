"""The generic train step: sharded == single device, accumulation, trainable filters, a PyTorch peer."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from rsdjax.config import load_model_config
from rsdjax.model.llama import Llama
from rsdjax.parallel.mesh import make_mesh
from rsdjax.parallel.sharding import create_sharded
from rsdjax.train.config import OptimConfig
from rsdjax.train.optimizer import lr_schedule, make_optimizer
from rsdjax.train.step import EMBEDDINGS, BatchSizeError, TrainStep, check_batch

CFG = load_model_config("tiny")
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, clip_norm=1.0)
B, T, STEPS = 8, 32, 3


def _batch(seed=0, b=B, t=T):
    """A packed batch with two documents per row (so segment ids and positions matter)."""
    rng = np.random.default_rng(seed)
    split = t // 3
    seg = np.where(np.arange(t) < split, 1, 2).astype(np.int32)
    pos = np.where(np.arange(t) < split, np.arange(t), np.arange(t) - split).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, split - 1] = 0
    return {"tokens": rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32),
            "targets": rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32),
            "loss_mask": mask, "segment_ids": np.tile(seg, (b, 1)), "positions": np.tile(pos, (b, 1))}


_STEPS = {}  # one TrainStep (one compile) per configuration, shared by the tests below


def _run(mesh_shape, grad_accum=1, trainable=nnx.Param, steps=STEPS, batches=None, cfg=CFG):
    key = (tuple(sorted(mesh_shape.items())), grad_accum, repr(trainable), repr(cfg))
    if key not in _STEPS:
        mesh = make_mesh(mesh_shape)
        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        tx, schedule = make_optimizer(OPTIM, 40)
        _STEPS[key] = TrainStep(abstract, tx, mesh, trainable=trainable, grad_accum=grad_accum, schedule=schedule)
    ts = _STEPS[key]
    model = create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), ts.mesh, "train")
    params, frozen = ts.split(model)
    initial = jax.tree.map(np.asarray, params)
    state = ts.init(params)
    losses = []
    for i in range(steps):
        batch = jax.device_put(batches[i] if batches else _batch(i), ts.batch_sharding)
        state, metrics = ts(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    host = lambda tree: jax.tree.map(np.asarray, tree)
    ts.initial_params = initial
    return losses, host(state.params), host(frozen), host(state.opt_state), ts


@pytest.fixture(scope="module")
def single():
    return _run({})


def _assert_close(a, b, atol):
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_shape,grad_accum", [({"fsdp": 2, "tensor": 4}, 1), ({"fsdp": 8}, 1), ({"fsdp": 4}, 2)],
                         ids=["fsdp2xtensor4", "fsdp8", "fsdp4-accum2"])
def test_sharded_step_matches_one_device(single, mesh_shape, grad_accum):
    """Sharded (and gradient-accumulated) steps equal the one-device full-batch step within float tolerance."""
    losses, params, _, opt_state, ts = _run(mesh_shape, grad_accum=grad_accum)
    np.testing.assert_allclose(losses, single[0], rtol=2e-6)
    _assert_close(params, single[1], atol=1e-4)  # Adam normalises tiny gradient differences up to ~lr
    _assert_close(opt_state, single[3], atol=1e-5)
    wq = ts.param_shardings["wq"].spec  # (layers, embed, q_heads, head_dim): fsdp on embed, tensor on heads
    assert wq[1] == "fsdp" and (wq[2] if len(wq) > 2 else None) == ("tensor" if "tensor" in mesh_shape else None)


def test_unrolled_layers_train_as_the_scan_does(single):
    """model.scan_layers=false (the layer loop unrolled, no layer-stacked residual buffers) computes
    what the scan computes."""
    losses, params, _, opt_state, _ = _run({}, cfg=dataclasses.replace(CFG, scan_layers=False))
    np.testing.assert_allclose(losses, single[0], rtol=2e-6)
    # the moments agree to 1e-6 (below), but Adam divides by sqrt(v): where a gradient is near zero, the two
    # programs' different rounding moves a weight by a visible fraction of lr (3e-3); seen: 2.2e-5, 1 of 65,536
    _assert_close(params, single[1], atol=5e-5)
    _assert_close(opt_state, single[3], atol=1e-6)


def test_embedding_stage_trains_only_embeddings_and_head():
    losses, params, frozen, _, ts = _run({}, trainable=EMBEDDINGS, steps=2)
    assert sorted(params) == ["embed", "lm_head"]
    assert sorted(frozen) == sorted(set(nnx.to_pure_dict(nnx.state(ts.merge(params, frozen), nnx.Param))) - set(params))
    for name in params:
        assert not np.array_equal(params[name], ts.initial_params[name]), name
    # the whole model after the step: frozen parts exactly as created, trained parts as returned
    merged = nnx.to_pure_dict(nnx.state(ts.merge(params, frozen), nnx.Param))
    assert all(np.array_equal(np.asarray(merged[k]), frozen[k]) for k in frozen)


def test_loss_falls_on_the_bundled_corpus(tiny_tokenizer_dir, tmp_path):
    from types import SimpleNamespace

    from rsdjax.data.pipeline import build_mixture
    from rsdjax.tokenizer import Tokenizer

    srcs = [SimpleNamespace(name="corpus", paths=["data/corpus"], weight=1.0)]
    mix = build_mixture(srcs, Tokenizer.load(tiny_tokenizer_dir), T, tmp_path, seed=0)
    batches = [mix.rows(i * B, B) for i in range(40)]
    losses, *_ = _run({"fsdp": 2, "tensor": 4}, steps=40, batches=batches)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses


def test_batch_size_not_divisible_by_mesh_is_a_clear_error():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert check_batch(8, 2, mesh) == 4
    with pytest.raises(BatchSizeError, match=r"batch_size=6 .* not divisible by the mesh's batch axes data=2 x fsdp=2 = 4"):
        check_batch(6, 1, mesh)
    with pytest.raises(BatchSizeError, match="micro-batches of 2 rows"):
        check_batch(8, 4, mesh)


def test_lr_schedule_warms_up_then_decays_to_min_ratio():
    o = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4)
    s = lr_schedule(o, 20)
    np.testing.assert_allclose([float(s(i)) for i in range(4)], [0.25, 0.5, 0.75, 1.0])
    assert float(s(4)) == pytest.approx(1.0) and float(s(20)) == pytest.approx(0.1)
    assert float(s(12)) == pytest.approx(0.55)  # cosine midpoint
    lin = lr_schedule(dataclasses.replace(o, decay="linear"), 20)
    assert float(lin(12)) == pytest.approx(0.55) and float(lin(8)) == pytest.approx(0.775)


def test_one_step_matches_pytorch_adamw(tiny_hf_dir, tmp_path):
    """Our step on the tiny HF Llama vs a plain PyTorch AdamW loop on the same weights and batch."""
    import torch
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    from rsdjax.checkpoint.hf import save_hf
    from rsdjax.loading import load_model

    o = OptimConfig(lr=1e-3, warmup_steps=0, decay="constant", weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)
    batches = [_batch(i, b=4, t=16) for i in range(2)]
    for b in batches:  # one document per row: HF's model has no segment ids
        b["segment_ids"][:] = 1
        b["positions"][:] = np.arange(16)
        b["loss_mask"][:] = 1

    mesh = make_mesh({})
    model = load_model(tiny_hf_dir, mesh=mesh, rules="train")
    tx, schedule = make_optimizer(o, 10)
    ts = TrainStep(model, tx, mesh, schedule=schedule)
    params, frozen = ts.split(model)
    state = ts.init(params)
    ours = []
    for b in batches:
        state, m = ts(state, frozen, jax.device_put(b, ts.batch_sharding))
        ours.append(float(m["loss"]))
    save_hf(ts.merge(state.params, frozen), tmp_path / "after")
    after = {}
    for f in sorted((tmp_path / "after").glob("*.safetensors")):
        after.update(load_file(f))

    torch.manual_seed(0)
    ref = LlamaForCausalLM.from_pretrained(tiny_hf_dir, torch_dtype=torch.float32)
    decay = [p for n, p in ref.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in ref.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    theirs = []
    for b in batches:
        logits = ref(torch.from_numpy(b["tokens"]).long()).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(b["targets"]).long().reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), o.clip_norm)
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    state_dict = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert sorted(after) == sorted(state_dict)
    for name, value in after.items():
        diff = np.abs(value - state_dict[name])
        # Adam divides by sqrt(v): a gradient entry near zero (or of opposite sign from float noise) can move
        # by up to lr per step differently, so: every entry within that bound, and 99.9% within float noise
        assert diff.max() <= 2 * o.lr * len(batches), name
        assert np.mean(diff <= 2e-6) >= 0.999, (name, np.mean(diff <= 2e-6))


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("bte,ehd->bthd", (2, 5, 8), (8, 3, 4)), ("bthd,hde->bte", (2, 5, 3, 4), (3, 4, 8)),
    ("btm,me->bte", (2, 5, 12), (12, 8)), ("bte,em->btm", (2, 5, 8), (8, 12))])
def test_projection_vjp_equals_einsum(equation, x_shape, w_shape):
    """The CPU-friendly weight gradient of rsdjax.model.projection is jnp.einsum's, up to float rounding."""
    import jax.numpy as jnp

    from rsdjax.model.projection import project

    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, w_shape))
    grads = lambda f: jax.grad(lambda x, w: (f(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
    assert np.array_equal(project(equation, x, w), jnp.einsum(equation, x, w))
    for ours, ref in zip(grads(lambda x, w: project(equation, x, w)), grads(lambda x, w: jnp.einsum(equation, x, w))):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_embedding_rows_from_keeps_old_rows_and_matches_adamw_on_new_ones():
    """`make_optimizer(..., first_row)`: rows (LM-head columns) below first_row get no update, weight
    decay included; the others, and every other parameter, get optax's AdamW update exactly."""
    import jax.numpy as jnp
    import optax

    o = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, clip_norm=0.0)
    rng = np.random.default_rng(0)
    params = {"embed": jnp.asarray(rng.normal(size=(10, 4)), jnp.float32),
              "lm_head": jnp.asarray(rng.normal(size=(4, 10)), jnp.float32),
              "w": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    masked, _ = make_optimizer(o, 5, first_row=7)
    plain = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    got = masked.update(grads, masked.init(params), params)[0]
    want = plain.update(grads, plain.init(params), params)[0]
    np.testing.assert_array_equal(got["embed"][:7], 0)
    np.testing.assert_array_equal(got["lm_head"][:, :7], 0)
    np.testing.assert_allclose(got["embed"][7:], want["embed"][7:], rtol=1e-6)
    np.testing.assert_allclose(got["lm_head"][:, 7:], want["lm_head"][:, 7:], rtol=1e-6)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
