"""Layer pipelining over the `stage` mesh axis (GPipe schedule), inside a shard_map manual over `stage`.

Each stage holds a contiguous group of L / S layers (the `layers -> stage` rule already puts them
there). The batch is cut into M microbatches; at clock tick t stage s runs microbatch t - s through
its layers and passes the result to stage s + 1 with one collective-permute, so after S - 1 ticks of
fill every stage is busy on a different microbatch (bubble fraction (S - 1) / (M + S - 1)).

  training   the forward below under `jax.value_and_grad`: reverse-mode AD runs the same schedule
             backwards (the transpose of a permute to s + 1 is a permute to s), i.e. GPipe with all
             microbatch activations kept (or recomputed per layer with `remat`).
  prefill    microbatches of prompts flow through the stages, each stage filling its own layers' KV cache.
  decode     the same schedule with one token per sequence; with M > 1 the slots' microbatches overlap.

Microbatches are strided (microbatch j = rows j, j + M, j + 2M, ...), so a batch already sharded over
`data` stays sharded: the reshape [B] -> [B / M, M] keeps the data split on the leading dimension.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rsdjax.config import ConfigError
from rsdjax.parallel.tensor_parallel import psum

STAGE = "stage"


def choose_microbatches(requested: int, batch: int, batch_shards: int, stages: int, cached: bool) -> int:
    """`requested` if given (it must divide the batch), else the largest divisor of the per-shard batch
    up to a cap. Without a cache (training) the cap is 4 x stages: GPipe's bubble (S-1)/(M+S-1) wants
    M >> S. With a cache (prefill, decode) it is S: S microbatches keep every stage busy, and each
    extra one re-reads the stage's weights once more per token."""
    if requested:
        if batch % requested:
            raise ConfigError(f"pipeline_microbatches={requested} does not divide the batch of {batch}")
        return requested
    rows = batch // batch_shards if batch % batch_shards == 0 else batch
    cap = stages if cached else 4 * stages
    return max(m for m in range(1, min(rows, cap) + 1) if rows % m == 0)


def split(a, m: int, axis: int = 0):
    """[..., B, ...] -> [..., B / m, m, ...]: microbatch j is index j on the new axis (strided rows)."""
    return a.reshape(a.shape[:axis] + (a.shape[axis] // m, m) + a.shape[axis + 1:])


def merge(a, axis: int = 0):
    return a.reshape(a.shape[:axis] + (a.shape[axis] * a.shape[axis + 1],) + a.shape[axis + 2:])


def _take(a, j, axis):
    return jax.lax.dynamic_index_in_dim(a, j, axis=axis, keepdims=False)


def _put(a, value, j, axis):
    return jax.lax.dynamic_update_index_in_dim(a, value, j, axis=axis)


def gpipe(stage_fn: Callable, x, aux, state, *, num_stages: int, num_microbatches: int):
    """Run `stage_fn` on every microbatch through all stages. Call inside a shard_map manual over `stage`.

    stage_fn(x_mb, aux_mb, state_mb) -> (x_mb, state_mb) runs this device's layers on one microbatch.
      x       [B, ...] the stage input (only stage 0 reads it)
      aux     pytree of [B, ...] arrays that travel with their microbatch (RoPE tables, masks, positions)
      state   pytree of per-stage [L_local, B, ...] arrays updated per microbatch (the KV cache), or ()
    Returns (y, state): y [B, ...] is the last stage's output, broadcast to every stage.
    """
    s_count, m_count = num_stages, num_microbatches
    stage = jax.lax.axis_index(STAGE)
    xs = split(x, m_count)
    auxs = jax.tree.map(lambda a: split(a, m_count), aux)
    states = jax.tree.map(lambda a: split(a, m_count, axis=1), state)
    vary = lambda a: jax.lax.pcast(a, (STAGE,), to="varying")  # noqa: E731  carries differ per stage
    first = jnp.zeros_like(_take(xs, 0, 1))
    carry0 = (vary(first), vary(jnp.zeros_like(xs)), states)

    def tick(carry, t):
        incoming, outputs, states = carry
        j = t - stage  # the microbatch this stage works on at tick t
        valid = (j >= 0) & (j < m_count)
        jc = jnp.clip(j, 0, m_count - 1)
        inp = jnp.where(stage == 0, _take(xs, jc, 1), incoming)
        aux_j = jax.tree.map(lambda a: _take(a, jc, 1), auxs)
        st_j = jax.tree.map(lambda a: _take(a, jc, 2), states)
        out, st_new = stage_fn(inp, aux_j, st_j)
        # only a real microbatch may change the cache; only the last stage's output is the result
        states = jax.tree.map(lambda a, old, new: _put(a, jnp.where(valid, new, old), jc, 2), states, st_j, st_new)
        outputs = _put(outputs, jnp.where(valid, out, _take(outputs, jc, 1)), jc, 1)
        incoming = jax.lax.ppermute(out, STAGE, [(i, i + 1) for i in range(s_count - 1)])
        return (incoming, outputs, states), None

    (_, outputs, states), _ = jax.lax.scan(tick, carry0, jnp.arange(m_count + s_count - 1))
    # one all-reduce hands the last stage's result to all stages (the others contribute zeros)
    y = psum(jnp.where(stage == s_count - 1, merge(outputs), 0), STAGE)
    return y, jax.tree.map(lambda a: merge(a, axis=1), states)
