"""The jitted, sharded evaluation step: per-row sums of next-token NLL and of the loss mask.

`EvalStep(model, mesh)` keeps only the model's structure; it is called with the model's whole
state as a pure dict (the same arrays, on the same shardings, as training holds them), so the
train loop evaluates without copying or resharding anything and without touching the optimizer,
the RNG or the data position: evaluation can never change the training trajectory.
Per-row (not per-batch) sums let one batch shape serve every source and every document length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.data.packing import BATCH_KEYS
from rsdjax.parallel.rules import activation_sharding
from rsdjax.parallel.sharding import as_rules, from_host, state_shardings
from rsdjax.train.step import PureView, batch_sharding, check_batch


def row_nll(model, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row, [B] float32: the masked next-token cross-entropy summed (nats), the mask summed, and the
    number of masked targets that are the argmax (lm-eval's `is_greedy`: all of them)."""
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    logits = logits.astype(jnp.float32)
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    hits = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32) * mask
    return (nll * mask).sum(axis=1), mask.sum(axis=1), hits.sum(axis=1)


class EvalStep:
    """One compiled evaluation forward for a model structure on a mesh (dropout off)."""

    def __init__(self, model: nnx.Module, mesh, rules="train", batch_size: int | None = None):
        self.mesh, self.rules = mesh, as_rules(rules)
        if batch_size is not None:
            check_batch(batch_size, 1, mesh, self.rules)
        model.eval()  # LoRA dropout off; the graphdef below carries the flag
        self.graphdef, state = nnx.split(model)
        self._view = PureView(state)
        self.shardings = nnx.to_pure_dict(state_shardings(state, mesh, self.rules))
        self.batch_sharding = batch_sharding(mesh, self.rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        self._jitted = jax.jit(self._rows, in_shardings=(self.shardings, self.batch_sharding),
                               out_shardings=(replicated,) * 3)

    def state_of(self, model: nnx.Module) -> dict:
        """A concrete model's state as this step takes it (placed on the step's shardings)."""
        return jax.device_put(nnx.to_pure_dict(nnx.split(model)[1]), self.shardings)

    def _rows(self, state: dict, batch: dict):
        with activation_sharding(self.mesh, self.rules):
            return row_nll(nnx.merge(self.graphdef, self._view.to_state(state)), batch)

    def __call__(self, state: dict, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host batch (numpy [B, T] per key) -> (nll sums, token counts, argmax hits), [B] float64 numpy.
        Each distinct T compiles once."""
        placed = {k: from_host(batch[k], self.batch_sharding) for k in BATCH_KEYS}
        with jax.set_mesh(self.mesh):
            out = self._jitted(state, placed)
        return tuple(np.asarray(x, np.float64) for x in out)


def serving_logits(cfg, w, tokens, positions, segment_ids=None):
    """The model's forward at every position over `rsdjax.infer.forward.ServingWeights` (the int8
    ones of `--quantize int8` or an int8 checkpoint): the same layers as `Llama.__call__`, unrolled."""
    from rsdjax.infer.forward import layer_view
    from rsdjax.model.attention import attend_with, causal_mask
    from rsdjax.model.llama import decoder_layer, embed_tokens, lm_logits, rope_tables

    b, t = tokens.shape
    rope, mask = rope_tables(cfg, positions), causal_mask(b, t, segment_ids)
    x = embed_tokens(cfg, w.embed, tokens)
    for p in w.layers:
        x = decoder_layer(cfg, x, layer_view(p, w.layout), rope, attend_with(mask))
    return lm_logits(cfg, x, w.final_norm, w.embed if w.lm_head is None else w.lm_head)


class ServingEvalStep(EvalStep):
    """`EvalStep` over serving weights (`serving_logits`); its state is the weights themselves."""

    def __init__(self, cfg, weights, mesh, rules="train", batch_size: int | None = None):
        self.mesh, self.rules, self.cfg = mesh, as_rules(rules), cfg
        if batch_size is not None:
            check_batch(batch_size, 1, mesh, self.rules)
        self.weights = weights
        self.batch_sharding = batch_sharding(mesh, self.rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        self._jitted = jax.jit(self._rows, out_shardings=(replicated,) * 3)

    def state_of(self, model=None):
        return self.weights

    def _rows(self, weights, batch: dict):
        with activation_sharding(self.mesh, self.rules):
            return row_nll(lambda tokens, positions, segment_ids: serving_logits(
                self.cfg, weights, tokens, positions, segment_ids), batch)
