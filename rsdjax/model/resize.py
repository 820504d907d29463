"""Resizing a model's vocabulary after a tokenizer extension (`rsdjax.vocab.extend_tokenizer`).

`resize_vocab`: new embedding rows and LM-head columns are the mean of the rows of the token's
pieces under the *old* tokenizer (fallback: mean of all old rows); padding rows up to a multiple
the mesh divides get the mean of all old rows. Old rows are untouched.
"""
from __future__ import annotations

import numpy as np

from rsdjax.tokenizer import Tokenizer
from rsdjax.vocab import VocabError, check_extension



def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def new_token_pieces(old: Tokenizer, new: Tokenizer) -> dict[int, list[int]]:
    """{new id: ids of its pieces under the old tokenizer} for every token `new` adds."""
    check_extension(old, new)
    old_vocab = old.hf.get_vocab(with_added_tokens=True)
    pieces = {}
    for token, i in sorted(new.hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
        if token in old_vocab:
            continue
        # the token string is in the model's own alphabet (byte-level), so the old BPE model splits it
        # directly; anything it cannot split (e.g. a new special token) falls back to the mean row
        ids = [t.id for t in old.hf.model.tokenize(token)]
        pieces[i] = ids if ids and all(j is not None for j in ids) else []
    return pieces


def _grow_table(table, pieces: dict[int, list[int]], old_rows: int, new_rows: int, sharding=None):
    """Grow a [V, E] table to [new_rows, E] by the documented rule, as one jitted program.

    Works on sharded arrays (also across processes): only index vectors are built on the host.
    Means are taken in float32 whatever the table's dtype.
    """
    import jax
    import jax.numpy as jnp

    new_ids = np.array(sorted(pieces), np.int32)
    if new_ids.size and new_ids.max() >= new_rows:
        raise VocabError(f"new token id {int(new_ids.max())} does not fit in vocab_size {new_rows}")
    flat = np.array([j for i in new_ids for j in pieces[int(i)]], np.int32)
    seg = np.array([k for k, i in enumerate(new_ids) for _ in pieces[int(i)]], np.int32)
    counts = np.array([len(pieces[int(i)]) for i in new_ids], np.float32)
    keep = min(old_rows, table.shape[0], new_rows)

    def grow(table, flat, seg, counts, new_ids):
        mean_all = table[:old_rows].astype(jnp.float32).mean(axis=0)
        pad = jnp.broadcast_to(mean_all.astype(table.dtype), (new_rows - keep, table.shape[1]))
        out = jnp.concatenate([table[:keep], pad], axis=0)
        sums = jax.ops.segment_sum(table[flat].astype(jnp.float32), seg, num_segments=new_ids.shape[0])
        rows = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], mean_all)
        return out.at[new_ids].set(rows.astype(table.dtype))

    return jax.jit(grow, out_shardings=sharding)(table, flat, seg, counts, new_ids)


def resize_vocab(params: dict, cfg, old: Tokenizer, new: Tokenizer, multiple: int = 128, shardings=None):
    """(new params, new ModelConfig) with the vocabulary grown to fit `new` (padded to `multiple`).

    `params` is the model's pure parameter dict. Rows of tokens that exist in `old` are copied bit
    for bit; the row of each new token is the float32 mean of the rows of its pieces under `old`
    (a token with no such pieces gets the mean of all old rows); rows past the new tokenizer
    (padding up to `multiple`) get the mean of all rows of the old tokenizer's tokens. The LM head's
    columns follow the same rule. `shardings`: optional {'embed': .., 'lm_head': ..} for the outputs.
    """
    import dataclasses

    if old.vocab_size > cfg.vocab_size:
        raise VocabError(f"old tokenizer has {old.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}; "
                         "tokenizer.base is not this model's tokenizer")
    pieces = new_token_pieces(old, new)
    new_size = max(round_up(new.vocab_size, multiple), cfg.vocab_size)
    shardings = shardings or {}
    out = dict(params)
    out["embed"] = _grow_table(params["embed"], pieces, old.vocab_size, new_size, shardings.get("embed"))
    if "lm_head" in params:
        head_t = _grow_table(params["lm_head"].T, pieces, old.vocab_size, new_size)
        out["lm_head"] = _transpose(head_t, shardings.get("lm_head"))
    return out, dataclasses.replace(cfg, vocab_size=new_size)


def _transpose(x, sharding):
    import jax

    return jax.jit(lambda a: a.T, out_shardings=sharding)(x)
