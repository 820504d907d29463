"""Model-level steps over the stacked KV cache: the prefill/decode `rsdjax plan --aot --mode infer`
compiles (the serving engine's per-layer programs are not wired into the AOT check yet), and the plain
loss-and-gradient the pipeline and shard_map TP tests differentiate. `--mode train` compiles the real
`rsdjax.train.step.TrainStep` (see aot.py).

Parameters travel as the pure dict of the model's nnx state ({name: array}); `nnx.merge` rebuilds
the module inside the trace, so abstract (shape-only) parameters compile without any memory.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rsdjax.model.llama import KVCache
from rsdjax.parallel.rules import activation_sharding


def next_token_loss(model, tokens):
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (float32 logits)."""
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_loss_and_grad(graphdef, mesh, rules):
    """params, tokens -> (loss, grads): the forward and backward every training step contains."""

    def loss(params, tokens):
        with activation_sharding(mesh, rules):
            return next_token_loss(nnx.merge(graphdef, params), tokens)

    return jax.value_and_grad(loss)


def make_prefill_step(graphdef, mesh, rules):
    """(params, tokens [B, P], cache) -> (last-token logits [B, V], cache): a prompt into the KV cache."""

    def step(params, tokens, cache: KVCache):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        with activation_sharding(mesh, rules):
            logits, cache = nnx.merge(graphdef, params)(tokens, positions, cache=cache)
        return logits[:, -1], cache

    return step


def make_decode_step(graphdef, mesh, rules):
    """(params, tokens [B, 1], positions [B, 1], cache) -> (logits [B, V], cache): one token per sequence."""

    def step(params, tokens, positions, cache: KVCache):
        with activation_sharding(mesh, rules):
            logits, cache = nnx.merge(graphdef, params)(tokens, positions, cache=cache)
        return logits[:, -1], cache

    return step
