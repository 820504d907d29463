"""The paged engine's device side: page pools, attention through block tables, and the jitted steps.

Every layer has one K and one V pool `[num_pages, page_size, kv_heads, head_dim]`, shared by all
sequences; a sequence's block table lists its pages in order. One function runs any batch of
(row, chunk) work: rows of `C` new tokens each (decode: C = 1; a prefill chunk: one row of C
tokens), each row at its own positions with its own block table. The new K/V are written into
the pools in place (the pools are donated) and attention reads the row's pages back through
`rsdjax.infer.paged_attention`, the one place that knows the page layout (pure JAX, every
backend), handed to the model's layer as its `attend` hook. A ragged paged attention kernel (Pallas
on TPU/GPU) replaces `paged_attention` and nothing else changes.

Pools are sharded like the contiguous cache: kv heads over `tensor` when they divide it,
replicated otherwise; pages are not split over `data` (any sequence may use any page), the rows
of a step are.

A step is two programs: the forward, compiled per (rows, width, attended pages), and sampling,
compiled per row count only (sorting the vocabulary and drawing noise cost about as much to compile
as a small model's forward, and warm-up compiles every forward shape). Sampling state lives here
too, one row per engine slot plus a spare row that padding rows of a batch point at (so they read
and write harmless values): PRNG key, tokens sampled so far, sampling settings, prompt-token mask
and output counts (penalties). It stays on the device for the whole life of a request, preemptions
included, so a recomputed request samples exactly as if it had never been paused.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.config import ModelConfig
from rsdjax.infer import forward
from rsdjax.infer.sampling import MAX_TOP_LOGPROBS, SamplingArrays, keys_from_seeds, sample, token_logprobs
from rsdjax.infer.paged_attention import paged_attention, write_pages
from rsdjax.model.llama import decoder_layer, embed_tokens, resolve_dtype, rope_tables
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import INFER_RULES, activation_sharding, active_sharding, constrain, resolve
from rsdjax.stored_executables import Stored

POOL_AXES = (None, None, "act_kv_heads", "head_dim")  # [pages, page_size, kv_heads, head_dim]


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (num_pages, page_size, cfg.num_kv_heads, cfg.resolved_head_dim)


def page_bytes(cfg: ModelConfig, page_size: int) -> int:
    """Bytes one page takes over all layers, K and V (unsharded)."""
    itemsize = jnp.dtype(resolve_dtype(cfg.dtype)).itemsize
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.resolved_head_dim * itemsize


def pool_sharding(cfg: ModelConfig, mesh, num_pages: int, page_size: int) -> NamedSharding:
    spec = resolve(POOL_AXES, pool_shape(cfg, num_pages, page_size), mesh_shape_of(mesh), INFER_RULES,
                   name="kv page pool")
    return NamedSharding(mesh, spec)


def pages_for_budget(cfg: ModelConfig, mesh, page_size: int, kv_cache_gb: float | None, fraction: float,
                     default_gb: float) -> int:
    """Pages a per-device byte budget holds: `kv_cache_gb`, else `fraction` of the device's free memory
    (`default_gb` where the backend reports none, as XLA:CPU does); a page's bytes split over the mesh
    axes its pool is sharded on."""
    spec = pool_sharding(cfg, mesh, 1, page_size).spec
    shape = mesh_shape_of(mesh)
    shards = math.prod(shape[a] for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry))
    per_device = page_bytes(cfg, page_size) // shards
    if kv_cache_gb is None:
        stats = jax.local_devices()[0].memory_stats() or {}
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
        budget = free * fraction if free > 0 else default_gb * 2**30
    else:
        budget = float(kv_cache_gb) * 2**30
    return int(budget // per_device)


def empty_pools(cfg: ModelConfig, mesh, num_pages: int, page_size: int) -> forward.LayerCache:
    sharding = pool_sharding(cfg, mesh, num_pages, page_size)
    shape, dtype, n = pool_shape(cfg, num_pages, page_size), resolve_dtype(cfg.dtype), cfg.num_layers
    arrays = jax.jit(lambda: [jnp.zeros(shape, dtype) for _ in range(2 * n)], out_shardings=[sharding] * (2 * n))()
    return forward.LayerCache(arrays[:n], arrays[n:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SeqState:
    """Per-slot sampling state (rows = slots + 1 spare row for padding)."""

    keys: jax.Array  # u32 [S, 2]
    steps: jax.Array  # i32 [S]: tokens sampled so far (the PRNG counter)
    params: SamplingArrays
    prompt_mask: jax.Array  # bool [S, V]
    counts: jax.Array  # i32 [S, V]


def empty_seq_state(cfg: ModelConfig, rows: int) -> SeqState:
    z = np.zeros(rows, np.float32)
    params = SamplingArrays(z, z + 1, np.zeros(rows, np.int32), z, z + 1, z, z)
    return SeqState(np.zeros((rows, 2), np.uint32), np.zeros(rows, np.int32), params,
                    np.zeros((rows, cfg.vocab_size), bool), np.zeros((rows, cfg.vocab_size), np.int32))


def paged_forward(cfg: ModelConfig, w: forward.ServingWeights, pools: forward.LayerCache, tokens, positions,
                  block_tables, last, lora=None):
    """tokens, positions [R, C] (position -1 = padding); block_tables [R, n]; last [R]: the column of
    each row whose logits are wanted; lora: None or (adapter pool arrays, adapter per row), as the slot
    engine's (`forward.with_adapters`) -> logits [R, V], the updated pools, the last layer's output [R, C, E]."""
    page_size, num_pages = pools.k[0].shape[1], pools.k[0].shape[0]
    real = positions >= 0
    pos = jnp.maximum(positions, 0)
    page_of = jnp.where(real, jnp.take_along_axis(block_tables, pos // page_size, axis=1), num_pages)
    pages = (page_of, pos % page_size, block_tables, positions)
    rope = rope_tables(cfg, pos)
    x = embed_tokens(cfg, w.embed, tokens)
    layer = _layer_over_pages(cfg, w.layout)
    new_k, new_v = [], []
    for i in range(len(w.layers)):
        lora_rows = forward.adapter_rows(lora, i)
        x, k_pool, v_pool = layer(x, w.layers[i], lora_rows, pools.k[i], pools.v[i], rope, pages)
        new_k.append(k_pool)
        new_v.append(v_pool)
    x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return forward._logits(cfg, w, x_last), forward.LayerCache(new_k, new_v), x


_LAYERS: dict[tuple, object] = {}


def _layer_over_pages(cfg: ModelConfig, layout: str):
    """One decoder layer reading and writing its page pools, jitted on its own so that a forward traces
    and lowers it once rather than once per layer (tracing the unrolled layers was most of a warm
    `rsdjax generate`'s start); XLA inlines the calls, so the compiled step is the same. One function
    per model, layout and sharding context (which `constrain` reads while tracing)."""
    key = (repr(cfg), layout, active_sharding())
    if key not in _LAYERS:
        def layer(x, weights, lora_rows, k_pool, v_pool, rope, pages):
            page_of, offset_of, block_tables, positions = pages
            p = forward.layer_with_adapters(weights, layout, lora_rows)
            pools = []

            def through_pages(q, k, v):
                pools.extend(constrain(a, POOL_AXES) for a in write_pages(k_pool, v_pool, k, v, page_of, offset_of))
                return paged_attention(q, *pools, block_tables, positions)

            x = decoder_layer(cfg, x, p, rope, through_pages)
            return x, *pools

        _LAYERS[key] = jax.jit(layer)
    return _LAYERS[key]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepBatch:
    """One step's rows (R) of C tokens each: decode (C = 1, R = a batch size) or one prompt chunk (R = 1)."""

    tokens: jax.Array  # i32 [R, C]
    positions: jax.Array  # i32 [R, C]: -1 = padding
    block_tables: jax.Array  # i32 [R, n]: the pages a row attends, in order
    last: jax.Array  # i32 [R]: the column whose logits are sampled
    rows: jax.Array  # i32 [R]: the slot (state row) of each row; padding rows use the spare one
    emit: jax.Array  # bool [R]: the sampled token is an output (not a mid-prompt chunk's)
    bitmask: jax.Array  # i32 [R, ceil(V / 32)]: the tokens each row's grammar allows (all ones: any)
    targets: jax.Array  # i32 [R, C]: the token each position is scored on (prompt logprobs)


def forward_step(cfg: ModelConfig, mesh, weights, pools, batch: StepBatch, lora, want_prompt_logprobs):
    """Forward R rows of C tokens -> the pools, each row's logits [R, V] at its `last` column, and (chunk
    shapes only, C > 1: decode rows score nothing) its prompt tokens' logprobs behind a runtime branch,
    so asking for them compiles nothing new."""
    with activation_sharding(mesh, INFER_RULES):
        logits, pools, hidden = paged_forward(cfg, weights, pools, batch.tokens, batch.positions,
                                              batch.block_tables, batch.last, lora)
        r, c, k = batch.tokens.shape[0], batch.tokens.shape[1], MAX_TOP_LOGPROBS
        prompt = None
        if c > 1:
            unscored = (jnp.zeros((r, c), jnp.float32), jnp.zeros((r, c, k), jnp.int32),
                        jnp.zeros((r, c, k), jnp.float32), jnp.zeros((r, c), jnp.int32))
            prompt = jax.lax.cond(want_prompt_logprobs,
                                  lambda: forward.prompt_logprobs(cfg, weights, hidden, batch.targets, k),
                                  lambda: unscored)
    return pools, logits, prompt


def sample_step(state: SeqState, logits, rows, emit, bitmask, want_logprobs):
    """One token per row from its slot's state (logprobs, top MAX_TOP_LOGPROBS, behind a runtime
    branch); the rows that `emit` advance their PRNG counter and output counts. Compiled once per row
    count (see the module docstring)."""
    params = jax.tree.map(lambda a: a[rows], state.params)
    sampled = sample(logits, params, state.keys[rows], state.steps[rows], state.prompt_mask[rows],
                     state.counts[rows], bitmask)
    r, k = logits.shape[0], MAX_TOP_LOGPROBS
    none = (jnp.zeros(r, jnp.float32), jnp.zeros((r, k), jnp.int32), jnp.zeros((r, k), jnp.float32))
    logprobs = jax.lax.cond(want_logprobs, lambda: token_logprobs(logits, sampled, k), lambda: none)
    inc = emit.astype(jnp.int32)
    state = dataclasses.replace(state, steps=state.steps.at[rows].add(inc),
                                counts=state.counts.at[rows, sampled].add(inc))
    return state, (sampled, logprobs)


def arm_slot(state: SeqState, slot, seed, params, prompt_mask) -> SeqState:
    """A new request in `slot`: its key (from `seed`, uint32 [2]: derived here, in the compiled step,
    since eagerly each of its few ops was its own dispatch) and settings, its prompt's tokens,
    nothing sampled yet."""
    key = keys_from_seeds(seed[None])[0]
    return SeqState(keys=state.keys.at[slot].set(key), steps=state.steps.at[slot].set(0),
                    params=jax.tree.map(lambda a, v: a.at[slot].set(v), state.params, params),
                    prompt_mask=state.prompt_mask.at[slot].set(prompt_mask),
                    counts=state.counts.at[slot].set(0))


@dataclasses.dataclass(frozen=True)
class PagedSteps:
    # each called as (key, *arguments): `Stored` executables (rsdjax/stored_executables.py)
    forward: Stored  # (weights, pools, batch, lora, want_prompt_logprobs) -> (pools, logits, prompt logprobs)
    sample: Stored  # (state, logits, rows, emit, bitmask, want_logprobs) -> (state, (sampled, logprobs))
    arm: Stored  # (state, slot, seed, params, prompt_mask) -> state
    pool_sharding: NamedSharding
    replicated: NamedSharding

    def step(self, weights, pools, state: SeqState, batch: StepBatch, lora, want_logprobs, want_prompt_logprobs):
        """One engine step, the forward then sampling -> (pools, state, (sampled, logprobs, prompt logprobs)).
        Executables are found by the step's shape (`Stored`); with an adapter pool's argument, whose
        shapes that key does not cover, by jit."""
        rows = batch.tokens.shape[0]
        pools, logits, prompt = self.forward(self.forward_key(weights, batch, lora), weights, pools, batch, lora,
                                             want_prompt_logprobs)
        state, (sampled, logprobs) = self.sample((rows, state.keys.shape[0]), state, logits, batch.rows, batch.emit,
                                                 batch.bitmask, want_logprobs)
        return pools, state, (sampled, logprobs, prompt)

    @staticmethod
    def forward_key(weights, batch: StepBatch, lora):
        """The forward's executable key: its weights' layout and the step's shape (None with an adapter
        pool, whose argument has more shapes than this says: jit dispatch then)."""
        rows, width = batch.tokens.shape
        return None if lora is not None else (weights.layout, rows, width, batch.block_tables.shape[1])


_COMPILED: dict[tuple, PagedSteps] = {}


def compiled_steps(cfg: ModelConfig, mesh, num_pages: int, page_size: int) -> PagedSteps:
    """Jitted steps shared by every engine with the same model, mesh and pool (recreating an engine
    reuses the compiled code)."""
    key = (repr(cfg), mesh, num_pages, page_size)
    if key not in _COMPILED:
        sharding = pool_sharding(cfg, mesh, num_pages, page_size)
        pools = forward.LayerCache([sharding] * cfg.num_layers, [sharding] * cfg.num_layers)
        replicated = NamedSharding(mesh, PartitionSpec())
        states = jax.tree.map(lambda _: replicated, empty_seq_state(cfg, 1))
        _COMPILED[key] = PagedSteps(
            forward=Stored("paged_forward", jax.jit(functools.partial(forward_step, cfg, mesh), donate_argnums=(1,),
                                                    out_shardings=(pools, replicated, replicated))),
            sample=Stored("paged_sample", jax.jit(sample_step, donate_argnums=(0,), out_shardings=(states, replicated))),
            arm=Stored("paged_arm", jax.jit(arm_slot, donate_argnums=(0,), out_shardings=states)),
            pool_sharding=sharding, replicated=replicated)
    return _COMPILED[key]
