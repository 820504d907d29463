"""The jitted train step, generic over *which* variables train.

`TrainStep(model, tx, mesh, trainable=FILTER)` splits an NNX model into the trainable variables
(any nnx filter: `nnx.Param` for full training, a LoRA variable type for adapters, `EMBEDDINGS`
for the first stage of an extended vocabulary) and everything else (frozen, passed in but never
donated or updated). One call is one optimizer update:

    state, metrics = step(state, frozen, batch)

* `batch`: {"tokens", "targets", "loss_mask", "segment_ids", "positions"}, each [B, T]
  (int32; loss_mask float32), B the global batch, sharded over the mesh's (data, fsdp) axes.
* the loss is the token-weighted mean over the whole global batch: with `grad_accum` = A the batch
  is cut into A micro-batches (each keeping every device busy), per-token loss *sums* and their
  gradients are accumulated in float32 and divided by the total weight once, so A only changes
  memory, not the result (up to float summation order).
* parameters and optimizer moments are sharded by `state_shardings(..., "train")` (fsdp + tensor),
  given explicitly as in/out shardings; the state argument is donated (updated in place).
* mixed precision: parameters and optimizer state keep their own dtype (float32 by default); the
  model computes in `cfg.dtype` (float32 on CPU, bfloat16 on accelerators); logits, loss and the
  gradient accumulator are float32. `cfg.remat` recomputes each layer in the backward pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import activation_sharding, constrain, resolve
from rsdjax.parallel.sharding import as_rules, shaped, state_shardings

# the first stage for an extended vocabulary: embedding table and LM head only
EMBEDDINGS = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("embed"), nnx.PathContains("lm_head")))

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, jax.Array]]


def lm_loss(model, batch: dict, rng) -> tuple[jax.Array, jax.Array]:
    """(sum of masked next-token cross-entropies, sum of the mask), both float32 scalars."""
    del rng  # Llama has no dropout; the key is there for loss functions that need one
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return (nll * mask).sum(), mask.sum()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 []: optimizer updates applied so far (over all stages)
    params: dict  # the trainable variables, as a pure dict {name: array} (nnx paths)
    opt_state: Any  # optax state over `params`
    rng: jax.Array  # uint32 [2]: raw PRNG key, split once per step


class PureView:
    """nnx.State <-> pure dict, keeping the State's structure (variable types, logical axes)."""

    def __init__(self, template: nnx.State):
        self.treedef = jax.tree.structure(template)
        pure = nnx.to_pure_dict(template)
        if not all(a is b for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(pure), strict=True)):
            raise AssertionError("nnx.State and its pure dict flatten in different orders")

    def to_state(self, pure: dict) -> nnx.State:
        return jax.tree.unflatten(self.treedef, jax.tree.leaves(pure))


def opt_state_shardings(abstract_opt, abstract_params, param_shardings, replicated):
    """Moments (subtrees shaped like the params) follow the params' shardings; the rest replicates."""
    pdef = jax.tree.structure(abstract_params)

    def like_params(x) -> bool:
        if isinstance(x, jax.ShapeDtypeStruct) and x.ndim == 0:
            return False
        return jax.tree.structure(x) == pdef

    return jax.tree.map(lambda x: param_shardings if like_params(x) else replicated, abstract_opt,
                        is_leaf=like_params)


class BatchSizeError(ValueError):
    pass


def batch_sharding(mesh, rules="train") -> NamedSharding:
    """How a [B, T] batch is laid out: B over the axes the rules give `batch` (data, fsdp)."""
    spec = resolve(("batch", None), (1 << 30, 1), mesh_shape_of(mesh), as_rules(rules), name="batch")
    return NamedSharding(mesh, spec)


def check_batch(batch_size: int, grad_accum: int, mesh, rules="train") -> int:
    """The number of batch shards; raises BatchSizeError if the micro-batch does not divide into them."""
    n, axes = 1, []
    for entry in batch_sharding(mesh, rules).spec[:1]:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= mesh.shape[axis]
            axes.append(f"{axis}={mesh.shape[axis]}")
    if batch_size % grad_accum or (batch_size // grad_accum) % n:
        raise BatchSizeError(f"batch_size={batch_size} with grad_accum={grad_accum} gives micro-batches of "
                             f"{batch_size / grad_accum:g} rows, not divisible by the mesh's batch axes "
                             f"{' x '.join(axes) or '(none)'} = {n}")
    return n


def reshard(tree, shardings):
    """Put arrays on `shardings` (a no-op for arrays already there). A PRNG key array (an nnx.Rngs stream)
    travels as its key data: with several processes device_put takes only plain arrays to a global sharding."""
    def put(x, sharding):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)
    return jax.tree.map(put, tree, shardings)


class TrainStep:
    """One compiled train step for a model structure, a trainable filter and an optimizer.

    `model` may be concrete or abstract (`nnx.eval_shape`); only its structure is kept.
    `schedule(step - stage_start)` is reported as the learning rate in the metrics.
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, mesh, *,
                 trainable=nnx.Param, rules="train", grad_accum: int = 1, loss_fn: LossFn = lm_loss,
                 schedule: Callable | None = None, stage_start: int = 0):
        self.tx, self.mesh, self.trainable = tx, mesh, trainable
        self.rules = as_rules(rules)
        self.grad_accum, self.loss_fn = grad_accum, loss_fn
        self.schedule, self.stage_start = schedule, stage_start
        self.graphdef, params, frozen = nnx.split(model, trainable, ...)
        if not jax.tree.leaves(params):
            raise ValueError(f"no variable of the model matches the trainable filter {trainable!r}")
        self._params_view, self._frozen_view = PureView(params), PureView(frozen)

        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.param_shardings = nnx.to_pure_dict(state_shardings(params, mesh, self.rules))
        self.frozen_shardings = nnx.to_pure_dict(state_shardings(frozen, mesh, self.rules))
        shapes = lambda s: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(s))
        abs_params, abs_frozen = shapes(params), shapes(frozen)
        abs_opt = jax.eval_shape(tx.init, abs_params)
        self.opt_shardings = opt_state_shardings(abs_opt, abs_params, self.param_shardings, self.replicated)
        self.state_shardings = TrainState(self.replicated, self.param_shardings, self.opt_shardings, self.replicated)
        self.abstract_state = TrainState(
            jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
            shaped(abs_params, self.param_shardings), shaped(abs_opt, self.opt_shardings),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated))
        self.abstract_frozen = shaped(abs_frozen, self.frozen_shardings)
        self.batch_sharding = batch_sharding(mesh, self.rules)
        self._jitted = jax.jit(self._step, donate_argnums=(0,),
                               in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_sharding),
                               out_shardings=(self.state_shardings, self.replicated))

    # ------------------------------------------------------------ state

    def split(self, model: nnx.Module) -> tuple[dict, dict]:
        """(trainable, frozen) pure dicts of a concrete model, placed on their shardings."""
        _, params, frozen = nnx.split(model, self.trainable, ...)
        return (reshard(nnx.to_pure_dict(params), self.param_shardings),
                reshard(nnx.to_pure_dict(frozen), self.frozen_shardings))

    def init(self, params: dict, step: int = 0, seed: int = 0) -> TrainState:
        """A fresh optimizer state for `params` (already on `param_shardings`), at `step`."""
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        scalars = jax.jit(lambda: (jnp.asarray(step, jnp.int32), jax.random.PRNGKey(seed)),
                          out_shardings=(self.replicated, self.replicated))()
        return TrainState(scalars[0], params, opt_state, scalars[1])

    def merge(self, params: dict, frozen: dict) -> nnx.Module:
        """The model with these trainable and frozen values (for evaluation or export)."""
        return nnx.merge(self.graphdef, self._params_view.to_state(params), self._frozen_view.to_state(frozen))

    # ------------------------------------------------------------ the step

    def __call__(self, state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):
            return self._jitted(state, frozen, batch)

    def lower(self, batch_size: int, seq_len: int):
        """Lower the step for abstract inputs (AOT check of a full-size config without memory)."""
        batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=self.batch_sharding)
                 for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
        with jax.set_mesh(self.mesh):
            return self._jitted.lower(self.abstract_state, self.abstract_frozen, batch)

    def _loss(self, params, frozen, batch, key):
        model = self.merge(params, frozen)
        loss_sum, weight = self.loss_fn(model, batch, key)
        return loss_sum, weight

    def _step(self, state: TrainState, frozen: dict, batch: dict):
        with activation_sharding(self.mesh, self.rules):
            rng, key = jax.random.split(state.rng)
            grad_fn = jax.value_and_grad(self._loss, has_aux=True)
            a = self.grad_accum
            if a == 1:
                (loss_sum, weight), grads = grad_fn(state.params, frozen, batch, key)
                grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            else:
                # row r goes to micro-batch r % a: every device keeps rows of every micro-batch
                micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1), batch)

                def body(carry, xs):
                    g_acc, l_acc, w_acc = carry
                    mb, k = xs
                    mb = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), mb)
                    (l, w), g = grad_fn(state.params, frozen, mb, k)
                    g_acc = jax.tree.map(lambda acc, gi: acc + gi.astype(jnp.float32), g_acc, g)
                    return (g_acc, l_acc + l, w_acc + w), None

                zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
                init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
                (grads, loss_sum, weight), _ = jax.lax.scan(body, init, (micro, jax.random.split(key, a)))
            grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
            scale = 1.0 / jnp.maximum(weight, 1.0)
            grads = jax.tree.map(lambda g: g * scale, grads)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        lr = self.schedule(state.step - self.stage_start) if self.schedule else jnp.zeros((), jnp.float32)
        metrics = {"loss": loss_sum * scale, "grad_norm": grad_norm, "tokens": weight, "lr": lr}
        return TrainState(state.step + 1, params, opt_state, rng), metrics
