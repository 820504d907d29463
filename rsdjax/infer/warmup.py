"""Compile a `SlotEngine`'s steps ahead of time (`jit(...).lower(...).compile()`, nothing runs).

A decode step compiles once per attention bucket (`SlotEngine.attend_buckets`); left alone, a
generation that grows past a bucket compiles in the middle of its stream. `rsdjax generate` compiles
every bucket its prompts can reach before the first token (`decode_buckets_for`), and `rsdjax warmup`
compiles all of an engine's shapes so that, with the persistent cache (rsdjax/compile_cache.py),
later processes load them from disk. The compiled executables land in the jitted functions' own
caches, so the engine's next call with the same shapes dispatches at once.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp

from rsdjax.infer.interface import SamplingParams
from rsdjax.infer.sampling import MAX_TOP_LOGPROBS, SamplingArrays, bitmask_words
from rsdjax.infer.shapes import bucket_for


def decode_buckets_for(engine, prompt_lengths: Iterable[int], max_new_tokens: int) -> list[int]:
    """The attention buckets a decode of these prompts can use: from the shortest prompt's first
    decode step to the longest prompt's last (every bucket in between, since slots finish unevenly)."""
    lengths = list(prompt_lengths)
    sizes = engine.attend_buckets
    lo = bucket_for(min(lengths) + 1, sizes)
    hi = bucket_for(min(max(lengths) + max_new_tokens, engine.max_context), sizes)
    return [b for b in sizes if lo <= b <= hi]


def _lora_stand_ins(engine, rows: int) -> list:
    """The steps' `lora` arguments for `rows` rows: None (no pool, or only base rows) and, with an
    adapter pool, the pool with an entry per row (`SlotEngine._lora`)."""
    if engine.adapters is None:
        return [None]
    return [None, (engine.adapters.layers, jax.ShapeDtypeStruct((rows,), jnp.int32))]


def lower_decode(engine, attend: int, adapters: bool = False):
    """The decode forward lowered as `SlotEngine.generate` calls it (base-model slots, or with
    `adapters` slots on the adapter pool)."""
    lora = _lora_stand_ins(engine, engine.max_slots)[-1 if adapters else 0]
    state = engine._state
    return engine._steps.decode.lower(engine.weights, engine._cache, state.tokens, state.positions, lora, int(attend))


def _compile_sampling(engine, logprobs: bool) -> None:
    """Decode's sampling program (one for every attention bucket: it sees only [slots, vocab] logits)."""
    top_k = MAX_TOP_LOGPROBS if logprobs else 0
    logits = jax.ShapeDtypeStruct((engine.max_slots, engine.cfg.vocab_size), jnp.float32,
                                  sharding=engine._steps.state_sharding)
    engine._steps.next_tokens.lower(engine._state, logits, engine._no_constraint, top_k).compile()


def compile_decode(engine, attend_buckets: Iterable[int], logprobs: bool = False) -> int:
    """Compile the decode step for each attention bucket (with an adapter pool, also its variant
    with adapters in the batch); returns how many attention buckets were compiled."""
    n = 0
    for attend in attend_buckets:
        for adapters in (False, True) if engine.adapters is not None else (False,):
            lower_decode(engine, attend, adapters).compile()
        n += 1
    _compile_sampling(engine, logprobs)
    return n


def compile_prefill(engine, rows: int, length: int, logprobs: bool = False):
    """Compile prefill (forward and sampling) for `rows` prompts padded to `length` and the insert of
    one of its rows."""
    steps = engine._steps
    top_k = MAX_TOP_LOGPROBS if logprobs else 0
    tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32)
    seeds = jax.ShapeDtypeStruct((rows, 2), jnp.uint32)
    params = SamplingArrays.from_params([SamplingParams()] * rows)
    bitmask = jax.ShapeDtypeStruct((rows, bitmask_words(engine.cfg.vocab_size)), jnp.int32)
    for lora in _lora_stand_ins(engine, rows):
        lowered = steps.prefill.lower(engine.weights, tokens, lengths, lora, 0)
        compiled = lowered.compile()  # both variants have the same outputs: what follows serves both
    # the programs after it see prefill's outputs as committed arrays: give the stand-ins their shardings
    cache, logits, _ = _committed(lowered, compiled)
    sampling = steps.first_tokens.lower(logits, tokens, lengths, params, seeds, bitmask, top_k)
    keys, prompt_mask = _committed(sampling, sampling.compile())[:2]
    one = jax.tree.map(lambda a: a[0], SamplingArrays.from_params([SamplingParams()]))
    # the engine passes row, slot, token and length as Python ints (weakly typed int32 scalars)
    steps.insert.lower(engine._cache, engine._state, cache, keys, prompt_mask, 0, 0, 0, 1, one).compile()


def _committed(lowered, compiled):
    """A compiled program's outputs as shape stand-ins with the shardings it gives them."""
    return jax.tree.map(lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
                        lowered.out_info, compiled.output_shardings)


def compile_for_prompts(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, logprobs: bool = False) -> None:
    """What `rsdjax.infer.generate.generate` will need for these prompts: the first batch's prefill
    and insert, and every decode bucket (later batches, when prompts outnumber slots, may add prefills)."""
    first = [len(p) for p in prompts[:engine.max_slots]]
    rows = 1 << (len(first) - 1).bit_length()
    compile_prefill(engine, rows, bucket_for(max(first), engine.prefill_buckets), logprobs)
    compile_decode(engine, decode_buckets_for(engine, map(len, prompts), max_new_tokens), logprobs)


def compile_all(engine, rows: Sequence[int] = (1,), logprobs: bool = False) -> dict:
    """Every prefill bucket for each row count in `rows`, its insert, and every decode bucket."""
    n_prefill = 0
    for r in sorted({1 << (int(x) - 1).bit_length() for x in rows if 1 <= int(x) <= engine.max_slots}):
        for length in engine.prefill_buckets:
            compile_prefill(engine, r, length, logprobs)
            n_prefill += 1
    n_decode = compile_decode(engine, engine.attend_buckets, logprobs)
    return {"prefill_shapes": n_prefill, "decode_shapes": n_decode}


__all__ = ["decode_buckets_for", "lower_decode", "compile_decode", "compile_prefill", "compile_for_prompts", "compile_all"]
