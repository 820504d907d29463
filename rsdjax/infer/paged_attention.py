"""Attention through block tables: the one place that knows the page layout (the paged engine's kernel).

    write_pages(k_pool, v_pool, k, v, pages, offsets) -> pools with this step's keys/values in place
    paged_attention(q, k_pool, v_pool, block_tables, positions) -> [R, C, H, D]

Pools are `[num_pages, page_size, kv_heads, head_dim]`; a row's context position j is entry
j // page_size of its block table, offset j % page_size. Pure JAX, so it runs on every backend; a
ragged paged attention kernel (Pallas on TPU/GPU) replaces `paged_attention` and nothing else changes.

Two forms, picked by the static width of the block tables:
- up to `BLOCK_PAGES` pages: gather the row's pages into one `[R, m * page_size, KV, D]` array and
  run the model's `attention` under the causal mask (one pass; fastest for short contexts). `m` is
  the step's furthest row rounded up to `STEP_TOKENS`, picked at run time among the compiled
  branches of a `lax.switch`, so the gather (most of a decode row's attention) costs the context the
  rows have, not the attend bucket, and no shape is added. SmolLM2-135M f32 on 2 cores, attention
  alone, 30 layers, rows at 192 tokens in a 256-token bucket: 8 decode rows 10 -> 8 ms, 32 rows
  37 -> 20 ms; four 128-token prompt chunks at 128: 71 -> 32 ms.
- wider: a loop over blocks of `BLOCK_PAGES` pages with an online softmax (flash attention's
  running max and sum), for as many blocks as the step's longest row reaches, a bound known only at
  run time. A step then costs the context its rows have, not the attend bucket's width (4x the
  reach at worst), and the whole context is never copied out of the pools. SmolLM2-135M f32 on 2
  cores, rows reaching 2,048 tokens (scripts/bench_serve_step.py --context 2048, the whole step):
  8 decode rows 136 -> 83 ms, a 256-token prompt chunk 756 -> 656 ms. At one block the single
  gather is faster (no loop, no running rescale), hence the two forms.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rsdjax.model.attention import attention, cache_mask

BLOCK_PAGES = 16  # pages a loop iteration attends (256 tokens at the default page size of 16)
STEP_TOKENS = 64  # the one-pass form's gather widths step by this many tokens (whole pages)
_MASKED = jnp.finfo(jnp.float32).min  # additive mask: finite, so a block a row cannot see adds exp(0) * 0


def write_pages(k_pool, v_pool, k, v, pages, offsets):
    """k, v [R, C, KV, D] into the pools at pages / offsets [R, C] (a page index >= the pool size drops
    the write: padding). The pools are donated by the caller, so XLA updates them in place."""
    k_pool = k_pool.at[pages, offsets].set(k.astype(k_pool.dtype), mode="drop")
    v_pool = v_pool.at[pages, offsets].set(v.astype(v_pool.dtype), mode="drop")
    return k_pool, v_pool


def paged_attention(q, k_pool, v_pool, block_tables, positions):
    """q [R, C, H, D] at positions [R, C] (-1: padding, sees nothing); block_tables [R, n] -> [R, C, H, D].
    Each token attends its row's context positions <= its own."""
    n, page_size = block_tables.shape[1], k_pool.shape[1]
    if n > BLOCK_PAGES:
        return _blockwise(q, k_pool, v_pool, block_tables, positions)
    widths = one_pass_widths(n, page_size)
    need = (jnp.max(positions) + page_size) // page_size  # pages the furthest row reaches (0: all padding)
    branch = jnp.minimum(jnp.searchsorted(jnp.asarray(widths), need), len(widths) - 1)
    return jax.lax.switch(branch, [functools.partial(_one_pass, m) for m in widths],
                          q, k_pool, v_pool, block_tables, positions)


def one_pass_widths(pages: int, page_size: int) -> list[int]:
    """The gather widths (in pages) of the one-pass form for a table of `pages` pages, one branch each."""
    step = max(1, STEP_TOKENS // page_size)
    return list(range(step, pages, step)) + [pages]


def warmup_reaches(pages: int, page_size: int) -> list[int]:
    """Furthest positions that, one step each, run every branch of `paged_attention` for a table of
    `pages` pages: the one-pass widths, or the blockwise loop's body. XLA:CPU sets a branch up the first
    time it runs it (~100 ms for SmolLM2's 30 layers), which warm-up should pay, not a serving step."""
    if pages > BLOCK_PAGES:
        return [BLOCK_PAGES * page_size - 1]
    return [w * page_size - 1 for w in one_pass_widths(pages, page_size)]


def _one_pass(pages: int, q, k_pool, v_pool, block_tables, positions):
    """Attention over the first `pages` pages of each row's table (all that any row reaches)."""
    k, v = _gather(k_pool, v_pool, block_tables[:, :pages])
    return attention(q, k, v, cache_mask(positions, k.shape[1]))


def _gather(k_pool, v_pool, block_tables):
    """The pages of each row, in table order -> k, v [R, n * page_size, KV, D]."""
    r, n = block_tables.shape
    return tuple(pool[block_tables].reshape(r, n * pool.shape[1], *pool.shape[2:]) for pool in (k_pool, v_pool))


def _blockwise(q, k_pool, v_pool, block_tables, positions):
    r, c, h, d = q.shape
    kv = k_pool.shape[2]
    block = BLOCK_PAGES * k_pool.shape[1]  # tokens per iteration
    blocks = -(-block_tables.shape[1] // BLOCK_PAGES)
    tables = jnp.pad(block_tables, ((0, 0), (0, blocks * BLOCK_PAGES - block_tables.shape[1])))
    reach = jnp.max(positions) + 1  # the furthest any row attends: later blocks are never read
    steps = jnp.minimum((reach + block - 1) // block, blocks)
    qs = (q.reshape(r, c, kv, h // kv, d) / math.sqrt(d)).astype(jnp.float32)

    def one_block(j, carry):
        top, total, acc = carry  # running max, sum of exponentials, weighted values: [R, KV, G, C(, D)]
        pages = jax.lax.dynamic_slice_in_dim(tables, j * BLOCK_PAGES, BLOCK_PAGES, axis=1)
        k, v = _gather(k_pool, v_pool, pages)
        scores = jnp.einsum("rckgd,rskd->rkgcs", qs, k, preferred_element_type=jnp.float32)
        seen = (j * block + jnp.arange(block))[None, None, :] <= positions[:, :, None]  # [R, C, block]
        scores = scores + jnp.where(seen, 0.0, _MASKED)[:, None, None]
        new_top = jnp.maximum(top, scores.max(-1))
        weights = jnp.exp(scores - new_top[..., None])
        shrink = jnp.exp(top - new_top)
        total = total * shrink + weights.sum(-1)
        acc = acc * shrink[..., None] + jnp.einsum("rkgcs,rskd->rkgcd", weights.astype(v.dtype), v,
                                                   preferred_element_type=jnp.float32)
        return new_top, total, acc

    g = h // kv
    start = (jnp.full((r, kv, g, c), _MASKED, jnp.float32), jnp.zeros((r, kv, g, c), jnp.float32),
             jnp.zeros((r, kv, g, c, d), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, steps, one_block, start)
    out = (acc / total[..., None]).astype(q.dtype)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(r, c, h, d)
