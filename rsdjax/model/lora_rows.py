"""Batched multi-LoRA (Punica / S-LoRA): every batch row adds the low-rank term of its own adapter.

`linear` calls `lora_rows_delta(x, rows, name, equation)` when a layer's weights carry `lora_rows`
(the serving engine's adapter pool, `rsdjax.infer.adapters`):

    rows[name]: {"a": [in..., n, r], "b": [n, r, out...]}   n adapters, the scale folded into b
    rows["index"]: int32 [batch]                            0 = the base model, i = pool entry i - 1

The layouts are chosen for the matmuls XLA:CPU runs well: flattened, A is a plain [in, n*r] matrix
and B an [n*r, out] one (no copy of the pool per step), so the product is two 2-D matmuls. The base
needs no zero entry: its one-hot row is all zeros.
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def _split(equation: str) -> tuple[str, str, str]:
    """(rest, kernel input, kernel output) letters of e.g. "bthd,hde->bte": ("bt", "hd", "e")."""
    lhs, out = equation.split("->")
    xs, ks = lhs.split(",")
    k_in = "".join(c for c in ks if c in xs)
    k_out = "".join(c for c in ks if c not in xs)
    rest = "".join(c for c in xs if c not in ks)
    if xs != rest + k_in or out != rest + k_out:  # every projection of `decoder_layer` has this form
        raise ValueError(f"lora_rows_delta: {equation!r} is not 'rest+in, in+out -> rest+out'")
    return rest, k_in, k_out


def rows_pick(index, n: int, r: int, dtype):
    """[batch, n*r] one-hot of each row's adapter, repeated over its rank (zeros for the base)."""
    pick = (index[:, None] == jnp.arange(1, n + 1, dtype=index.dtype)[None, :]).astype(dtype)
    return jnp.repeat(pick, r, axis=1)


def lora_rows_delta(x, rows: dict, name: str, equation: str):
    """sum over the pool of [row's adapter] x A B, exactly (the other adapters' terms are zeroed).

    With at least as many rows as adapters, every adapter's x A is formed in one matmul against the
    whole pool (read once) and each row keeps its own; with fewer, each row gathers its A and B
    (Punica's gather: copies an adapter per row, but reads only the ones in use).
    """
    rest, k_in, _ = _split(equation)
    a, b = rows[name]["a"].astype(x.dtype), rows[name]["b"].astype(x.dtype)
    index = rows["index"]
    n, r = b.shape[0], b.shape[1]
    lead, in_shape, out_shape = x.shape[:len(rest)], x.shape[len(rest):], b.shape[2:]
    batch, d_in, d_out = lead[0], math.prod(in_shape), math.prod(out_shape)
    x3 = x.reshape(batch, -1, d_in)  # [B, T, in]
    if n <= batch:
        h = jnp.matmul(x3.reshape(-1, d_in), a.reshape(d_in, n * r)).reshape(batch, -1, n * r)
        h = h * rows_pick(index, n, r, x.dtype)[:, None, :]
        y = jnp.matmul(h.reshape(-1, n * r), b.reshape(n * r, d_out))
        return y.reshape(*lead, *out_shape)
    entry = jnp.maximum(index - 1, 0)
    a_rows = jnp.take(a.reshape(d_in, n, r), entry, axis=1)  # [in, B, r]
    h = jnp.einsum("bti,ibr->btr", x3, a_rows) * (index > 0).astype(x.dtype)[:, None, None]
    y = jnp.einsum("btr,bro->bto", h, jnp.take(b.reshape(n, r, d_out), entry, axis=0))
    return y.reshape(*lead, *out_shape)
