"""Attention behind one small interface: `attention(q, k, v, mask)`, the layer's `attend` hook, and the masks.

A layer calls `attend(q, k, v)` (`attend_with`); a KV cache, pages or a fused kernel replace the hook
and the layer does not change (the paged engine's is `rsdjax/infer/paged_attention.py`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention(q, k, v, mask):
    """Grouped-query attention. q [B,T,H,D]; k, v [B,S,KV,D]; mask [B,T,S] (True = attend)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    # one query row (decoding one sequence): XLA:CPU's library dots cost ~0.1 ms a call at this size,
    # a multiply-reduce loop a fraction of it: 30 layers x 2 of them were 15% of the step
    single = b * t == 1
    # prompt rows (t > 1): queries head-major [B, KV, G*T, D] and keys/values [B, KV, S, D], so both matmuls
    # have (batch, kv head) leading and give the scores [B, KV, G, T, S] as they are laid out; from "btkgd"
    # XLA:CPU transposed the whole score tensor instead (attention fwd+bwd of bench_train's layer ~20% faster,
    # a 256-token prompt chunk ~10%). One query row per sequence keeps the form below (fastest there).
    many = t > 1
    if single:
        scores = jnp.sum(q[:, :, :, :, None].astype(jnp.float32) * jnp.swapaxes(k, 1, 2)[:, None, :, None].astype(
            jnp.float32), axis=-1)
        scores = jnp.moveaxis(scores, 1, 3) / math.sqrt(d)  # [B, KV, G, T, S]
    elif many:
        q = jnp.transpose(q / math.sqrt(d), (0, 2, 3, 1, 4)).reshape(b, kv, -1, d)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv, h // kv, t, k.shape[2])
    else:
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    # an additive mask (same values as jnp.where): its gradient needs no layer-stacked copy of the mask
    scores = scores + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if single:
        out = jnp.sum(probs[..., None] * jnp.swapaxes(v, 1, 2)[:, :, None, None], axis=-2)
    elif many:
        out = jnp.einsum("bkms,bksd->bkmd", probs.reshape(b, kv, -1, probs.shape[-1]), v).reshape(b, kv, -1, t, d)
    else:
        # batch dims first in the output, as dot_general produces them, then move t: asked for
        # "btkgd" directly, XLA:CPU picks a slow batched-matmul path for decoding (t = 1), 5-15x slower
        out = jnp.einsum("bkgts,bskd->bkgtd", probs, v)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)


def attend_with(mask, kv=None):
    """The layer's attention hook, `attend(q, k, v) -> [B, T, H, D]`, in its usual form.

    `kv(k, v)` (optional) first puts this step's keys/values [B, T, KV, D] wherever the caller keeps
    them (a KV cache, pages) and returns the ones to attend over; then `attention` under `mask`. A
    paged or fused kernel replaces the whole hook and the layer does not change.
    """
    def attend(q, k, v):
        if kv is not None:
            k, v = kv(k, v)
        return attention(q, k, v, mask)

    return attend


def causal_mask(batch: int, length: int, segment_ids=None):
    """[B, T, T]: each token sees itself and earlier ones (of its own packed segment, if given)."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (batch, length, length))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def cache_mask(positions, length: int):
    """[B, T, S]: a token at `positions` [B, T] sees cache positions [0, length) up to its own."""
    return jnp.arange(length)[None, None, :] <= positions[:, :, None]
