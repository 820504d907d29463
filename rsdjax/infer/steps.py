"""The slot engine's device side: per-slot state and its jitted steps (prefill, insert, decode, each
forward followed by its sampling program).

The steps are compiled once per (model config, mesh, slots, context) and shared by every engine
with those, so re-creating an engine (an in-process CLI run, a test, a server restart) reuses the
compiled code instead of compiling again. Decode and insert donate the cache and the slot state
and have fixed output shardings, so both stay in place, with the same layout, step after step.
Sampling is a program of its own, compiled per row count rather than per prompt or attention
bucket: sorting the vocabulary and drawing noise cost about as much to compile as a small model's
whole forward.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.config import ModelConfig
from rsdjax.infer import forward, staged
from rsdjax.infer.sampling import SamplingArrays, keys_from_seeds, sample, token_logprobs
from rsdjax.parallel.rules import INFER_RULES, activation_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot decode state on the device (replicated: it is small next to the cache)."""

    tokens: jax.Array  # i32 [S]: the token each slot feeds next
    positions: jax.Array  # i32 [S]: where that token's K/V goes
    steps: jax.Array  # i32 [S]: tokens sampled so far by the slot's request (the PRNG counter)
    keys: jax.Array  # u32 [S, 2]: the request's PRNG key
    params: SamplingArrays
    prompt_mask: jax.Array  # bool [S, V]: tokens of the prompt (repetition penalty)
    counts: jax.Array  # i32 [S, V]: output token counts (penalties)


def empty_state(cfg: ModelConfig, max_slots: int, max_context: int) -> SlotState:
    s, v = max_slots, cfg.vocab_size
    zeros_i = np.zeros(s, np.int32)
    params = SamplingArrays(np.zeros(s, np.float32), np.ones(s, np.float32), zeros_i, np.zeros(s, np.float32),
                            np.ones(s, np.float32), np.zeros(s, np.float32), np.zeros(s, np.float32))
    # idle slots sit at position max_context: their cache writes are dropped
    return SlotState(zeros_i, np.full(s, max_context, np.int32), zeros_i, np.zeros((s, 2), np.uint32),
                     params, np.zeros((s, v), bool), np.zeros((s, v), np.int32))


def layout(mesh):
    """The serving layout for this mesh: `forward` (per-layer arrays) with one stage, `staged` (stacked
    layers and cache split over `stage`, run as a pipeline) with more."""
    return staged if int(dict(mesh.shape).get("stage", 1)) > 1 else forward


def serving_weights(model, mesh, max_rows: int):
    """The weights as the steps read them, in the stored layout fastest for up to `max_rows` decode rows."""
    if layout(mesh) is staged:
        return staged.weights(model, mesh)
    return forward.serving_weights(model, mesh, forward.layout_for(max_rows))


def empty_cache(cfg: ModelConfig, mesh, max_slots: int, max_context: int):
    return layout(mesh).empty_cache(cfg, mesh, max_slots, max_context)


def prefill_step(cfg: ModelConfig, mesh, weights, tokens, lengths, lora, prompt_top_k: int = 0):
    """Padded prompts [rows, bucket] -> their K/V and last-token logits, and with `prompt_top_k` the
    logprobs of every prompt token (`forward.prompt_logprobs`)."""
    with activation_sharding(mesh, INFER_RULES):
        if prompt_top_k:
            logits, cache, hidden = layout(mesh).prefill(cfg, weights, tokens, lengths, return_hidden=True,
                                                         lora=lora)
            prompt = forward.prompt_logprobs(cfg, weights, hidden, forward.next_tokens(tokens), prompt_top_k)
        else:
            logits, cache = layout(mesh).prefill(cfg, weights, tokens, lengths, lora=lora)
            prompt = None
    return cache, logits, prompt


def first_tokens(logits, tokens, lengths, params, seeds, bitmask, top_k: int):
    """Prefill's sampling: PRNG keys, prompt masks and first tokens (+ logprobs)."""
    rows, vocab = logits.shape
    real = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    prompt_mask = jnp.zeros((rows, vocab), bool).at[
        jnp.arange(rows)[:, None], jnp.where(real, tokens, vocab)].set(True, mode="drop")
    keys = keys_from_seeds(seeds)
    first = sample(logits, params, keys, jnp.zeros(rows, jnp.int32), prompt_mask,
                   jnp.zeros((rows, vocab), jnp.int32), bitmask)
    logprobs = token_logprobs(logits, first, top_k) if top_k else None
    return keys, prompt_mask, first, logprobs


def insert_step(cfg: ModelConfig, put_rows, cache, state: SlotState, prefilled_cache, keys, prompt_mask, row, slot,
                token, length, params):
    """Row `row` of a prefill's outputs -> slot `slot` of the cache (`put_rows` of the layout) and the state."""
    cache = jax.tree.map(lambda dst, src: put_rows(dst, src, row, slot), cache, prefilled_cache)
    counts = jnp.zeros((cfg.vocab_size,), jnp.int32).at[token].set(1)  # the first token is an output
    state = SlotState(
        tokens=state.tokens.at[slot].set(token), positions=state.positions.at[slot].set(length),
        steps=state.steps.at[slot].set(1), keys=state.keys.at[slot].set(keys[row]),
        params=jax.tree.map(lambda a, v: a.at[slot].set(v), state.params, params),
        prompt_mask=state.prompt_mask.at[slot].set(prompt_mask[row]), counts=state.counts.at[slot].set(counts))
    return cache, state


def decode_step(cfg: ModelConfig, mesh, weights, cache, tokens, positions, lora, attend: int):
    """One token's forward for every slot -> (cache, logits [slots, V])."""
    with activation_sharding(mesh, INFER_RULES):
        logits, cache = layout(mesh).decode(cfg, weights, cache, tokens, positions, attend, lora)
    return cache, logits


def next_tokens(state: SlotState, logits, bitmask, top_k: int):
    """Decode's sampling: a token per slot, the state advanced."""
    tokens = sample(logits, state.params, state.keys, state.steps, state.prompt_mask, state.counts, bitmask)
    logprobs = token_logprobs(logits, tokens, top_k) if top_k else None
    rows = jnp.arange(tokens.shape[0])
    state = dataclasses.replace(state, tokens=tokens, positions=state.positions + 1, steps=state.steps + 1,
                                counts=state.counts.at[rows, tokens].add(1))
    return state, (tokens, logprobs)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    # (weights, tokens, lengths, lora, prompt_top_k) -> (cache, logits, prompt logprobs); lora: None, or
    # (adapter pool layers, adapter index per row) -- see rsdjax.infer.adapters
    prefill: object
    first_tokens: object  # (logits, tokens, lengths, params, seeds, bitmask, top_k) -> (keys, prompt_mask, first, logprobs)
    insert: object  # (cache, state, prefilled_cache, keys, prompt_mask, row, slot, token, length, params)
    decode: object  # (weights, cache, tokens, positions, lora, attend) -> (cache, logits)
    next_tokens: object  # (state, logits, bitmask, top_k) -> (state, (tokens, logprobs))
    cache_sharding: NamedSharding
    state_sharding: NamedSharding

    def prefill_and_sample(self, weights, tokens, lengths, params, seeds, bitmask, lora, top_k: int,
                           prompt_top_k: int = 0):
        """-> (cache, keys, prompt_mask, first tokens, logprobs, prompt logprobs)."""
        cache, logits, prompt = self.prefill(weights, tokens, lengths, lora, prompt_top_k)
        keys, prompt_mask, first, logprobs = self.first_tokens(logits, tokens, lengths, params, seeds, bitmask, top_k)
        return cache, keys, prompt_mask, first, logprobs, prompt

    def decode_and_sample(self, weights, cache, state: SlotState, bitmask, lora, attend: int, top_k: int):
        """-> (cache, state, (tokens, logprobs))."""
        cache, logits = self.decode(weights, cache, state.tokens, state.positions, lora, attend)
        state, out = self.next_tokens(state, logits, bitmask, top_k)
        return cache, state, out


_COMPILED: dict[tuple, CompiledSteps] = {}


def compiled_steps(cfg: ModelConfig, mesh, max_slots: int, max_context: int) -> CompiledSteps:
    key = (repr(cfg), mesh, max_slots, max_context)
    if key not in _COMPILED:
        impl = layout(mesh)
        cache_sharding = impl.cache_sharding(cfg, mesh, max_slots, max_context)
        cache_shardings = impl.cache_shardings(cfg, mesh, max_slots, max_context)
        replicated = NamedSharding(mesh, PartitionSpec())
        state_shardings = jax.tree.map(lambda _: replicated, empty_state(cfg, 1, 1))
        _COMPILED[key] = CompiledSteps(
            prefill=jax.jit(functools.partial(prefill_step, cfg, mesh), static_argnums=(4,)),
            first_tokens=jax.jit(first_tokens, static_argnums=(6,)),
            insert=jax.jit(functools.partial(insert_step, cfg, impl.put_rows), donate_argnums=(0, 1),
                           out_shardings=(cache_shardings, state_shardings)),
            decode=jax.jit(functools.partial(decode_step, cfg, mesh), static_argnums=(5,), donate_argnums=(1,),
                           out_shardings=(cache_shardings, replicated)),
            next_tokens=jax.jit(next_tokens, static_argnums=(3,), donate_argnums=(0,),
                                out_shardings=(state_shardings, replicated)),
            cache_sharding=cache_sharding, state_sharding=replicated)
    return _COMPILED[key]
