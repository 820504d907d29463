"""Pipelined serving (a mesh with stage > 1): the model's stacked layers and cache under its GPipe schedule.

The stage=1 serving layout (`forward.py`) unrolls the layers into per-layer arrays, which cannot be
split by stage. Here the weights stay stacked `[layers, ...]` with layers over `stage` (each stage
holds its contiguous group, as in training) and the KV cache is the model's `[layers, slots, length,
kv_heads, head_dim]`, whose layer dim is split over `stage` too: a stage's cache lives with its
layers. Prefill and decode run the model's own `layer_scan` through `rsdjax.parallel.layer_stack`,
whose GPipe schedule splits the rows (slots) into up to `stage` microbatches, so the stages work on
different slots at once and only activations cross between them (one collective-permute per tick).
The functions mirror forward.py's (weights, empty_cache, cache_sharding, prefill, decode, put_rows),
so `steps.py` picks one module or the other by the mesh.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.config import ConfigError, ModelConfig
from rsdjax.model.attention import cache_mask
from rsdjax.model.llama import (CACHE_AXES, PARAM_AXES, KVCache, embed_tokens, layer_scan, lm_logits, resolve_dtype,
                                rope_tables)
from rsdjax.parallel import layer_stack
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import INFER_RULES, resolve
from rsdjax.parallel.sharding import jit_or_shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StackedWeights:
    embed: jax.Array  # [vocab, embed]
    final_norm: jax.Array  # [embed]
    lm_head: jax.Array | None  # [vocab, embed] (the model's [embed, vocab] transposed); None when tied
    layers: dict  # the model's layer_params(): every leaf [layers, ...], layers over `stage`


def weights(model, mesh) -> StackedWeights:
    """The model's arrays in compute dtype, each keeping its sharding (layers stay on their stage);
    shape-only for a shape-only model (see `forward.serving_weights`)."""
    cfg = model.cfg
    dtype = resolve_dtype(cfg.dtype)
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    head = None if cfg.tie_word_embeddings else model.lm_head.get_value()
    tree = (model.embed.get_value(), model.final_norm.get_value(), head, model.layer_params())

    def sharding_of(a):
        s = getattr(a, "sharding", None)
        return s if isinstance(s, NamedSharding) else NamedSharding(mesh, PartitionSpec())

    shardings = jax.tree.map(sharding_of, tree)
    if head is not None:  # stored [vocab, embed]: the [embed, vocab] spec reversed
        spec = tuple(shardings[2].spec) + (None,) * 2
        shardings = (shardings[0], shardings[1], NamedSharding(mesh, PartitionSpec(spec[1], spec[0])), shardings[3])

    def prepare(tree):
        embed, norm, head, layers = jax.tree.map(cast, tree)
        return embed, norm, None if head is None else head.T, layers

    return StackedWeights(*jit_or_shapes(prepare, shardings, tree))


def cache_sharding(cfg: ModelConfig, mesh, batch: int, length: int) -> NamedSharding:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
    return NamedSharding(mesh, resolve(CACHE_AXES, shape, mesh_shape_of(mesh), INFER_RULES, name="kv cache"))


def cache_shardings(cfg: ModelConfig, mesh, batch: int, length: int) -> KVCache:
    s = cache_sharding(cfg, mesh, batch, length)
    return KVCache(s, s)


def empty_cache(cfg: ModelConfig, mesh, batch: int, length: int) -> KVCache:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.resolved_head_dim)
    dtype = resolve_dtype(cfg.dtype)
    make = jax.jit(lambda: KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
                   out_shardings=cache_shardings(cfg, mesh, batch, length))
    return make()


def put_rows(dst: jax.Array, src: jax.Array, row, slot) -> jax.Array:
    """Row `row` of a prefill's cache [L, rows, bucket, KV, D] into slot `slot` of the engine's cache."""
    return jax.lax.dynamic_update_slice(dst, jax.lax.dynamic_slice_in_dim(src, row, 1, 1), (0, slot, 0, 0, 0))


def _layers(cfg: ModelConfig, w: StackedWeights, x, positions, cache: KVCache):
    """x [B, T, E] through every layer, writing K/V at `positions`; the pipeline when the mesh has stages."""
    aux = (*rope_tables(cfg, positions), cache_mask(positions, cache.k.shape[2]), positions)
    run = functools.partial(layer_scan, cfg)
    stack = layer_stack.custom_runner(cfg)
    if stack is None:
        x, kv = run(w.layers, x, aux, (cache.k, cache.v))
    else:
        x, kv = stack.run(run, x, w.layers, aux, PARAM_AXES, (cache.k, cache.v), CACHE_AXES)
    return x, KVCache(*kv)


def _logits(cfg: ModelConfig, w: StackedWeights, x):
    return lm_logits(cfg, x, w.final_norm, w.embed if w.lm_head is None else w.lm_head)


NO_ADAPTERS = ("per-request LoRA adapters are not served on a mesh with stage > 1 yet; use stage=1 "
               "(or merge the adapter: rsdjax lora merge)")


def _no_adapters(lora) -> None:
    if lora is not None:
        raise ConfigError(NO_ADAPTERS)


def prefill(cfg: ModelConfig, w: StackedWeights, tokens, lengths, return_hidden: bool = False, lora=None):
    """Padded prompts [B, T] -> last real token's logits [B, V] and the K/V of all T positions (and the
    final hidden states [B, T, E] with `return_hidden`, for forward.prompt_logprobs)."""
    _no_adapters(lora)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    dtype = resolve_dtype(cfg.dtype)
    shape = (cfg.num_layers, b, t, cfg.num_kv_heads, cfg.resolved_head_dim)
    x, cache = _layers(cfg, w, embed_tokens(cfg, w.embed, tokens), positions,
                       KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return (_logits(cfg, w, last), cache, x) if return_hidden else (_logits(cfg, w, last), cache)


def decode(cfg: ModelConfig, w: StackedWeights, cache: KVCache, tokens, positions, attend: int, lora=None):
    """One token per slot (writes past the cache end are dropped: idle slots). `attend` is accepted for
    forward.decode's signature; the cache mask already limits each slot to positions <= its own."""
    del attend
    _no_adapters(lora)
    x, cache = _layers(cfg, w, embed_tokens(cfg, w.embed, tokens[:, None]), positions[:, None], cache)
    return _logits(cfg, w, x[:, 0]), cache
