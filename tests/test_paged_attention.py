"""Attention through block tables: the loop over blocks (online softmax, as far as the furthest row
reaches) equals one gather of the whole table under the causal mask, the model's own `attention`."""
import jax
import jax.numpy as jnp
import numpy as np

from rsdjax.infer import paged_attention as pa
from rsdjax.model.attention import attention, cache_mask

PAGE, KV, GROUP, D = 4, 2, 3, 8


def one_gather(q, k_pool, v_pool, tables, positions):
    k, v = pa._gather(k_pool, v_pool, tables)
    return attention(q, k, v, cache_mask(positions, k.shape[1]))


def test_blocks_equal_one_gather_for_decode_rows_chunks_and_padding():
    rng = np.random.default_rng(0)
    pages = 3 * pa.BLOCK_PAGES + 5  # the last block is partial
    pool = lambda: jnp.asarray(rng.standard_normal((4 * pages, PAGE, KV, D)), jnp.float32)  # noqa: E731
    k_pool, v_pool = pool(), pool()
    tables = jnp.asarray(rng.permutation(4 * pages)[:3 * pages].reshape(3, pages), jnp.int32)
    context = pages * PAGE
    for width, last in ((1, [5, context - 1, 2 * pa.BLOCK_PAGES * PAGE + 1]), (6, [40, 11, 90])):
        positions = np.asarray([np.arange(p - width + 1, p + 1) for p in last], np.int32)
        positions[1, :2] = -1  # padding tokens see nothing; their output is never read
        q = jnp.asarray(rng.standard_normal((3, width, KV * GROUP, D)), jnp.float32)
        got = pa._blockwise(q, k_pool, v_pool, tables, jnp.asarray(positions))
        want = one_gather(q, k_pool, v_pool, tables, jnp.asarray(positions))
        real = positions >= 0
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6, rtol=2e-5)


def test_the_loop_reads_only_the_blocks_its_rows_reach():
    """Blocks past the furthest position are never read: poisoning them changes nothing."""
    rng = np.random.default_rng(1)
    pages = 4 * pa.BLOCK_PAGES
    k_pool = rng.standard_normal((pages, PAGE, KV, D)).astype(np.float32)
    v_pool = rng.standard_normal((pages, PAGE, KV, D)).astype(np.float32)
    tables = jnp.arange(pages, dtype=jnp.int32)[None]
    positions = jnp.asarray([[pa.BLOCK_PAGES * PAGE + 3]], jnp.int32)  # inside the second block
    q = jnp.asarray(rng.standard_normal((1, 1, KV * GROUP, D)), jnp.float32)
    clean = pa.paged_attention(q, jnp.asarray(k_pool), jnp.asarray(v_pool), tables, positions)
    k_pool[2 * pa.BLOCK_PAGES:] = np.nan
    v_pool[2 * pa.BLOCK_PAGES:] = np.nan
    poisoned = jax.jit(pa.paged_attention)(q, jnp.asarray(k_pool), jnp.asarray(v_pool), tables, positions)
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))


def test_one_pass_reads_only_the_pages_its_rows_reach_and_equals_the_whole_table():
    """Within one block, the gather stops at the furthest row rounded up to STEP_TOKENS: the pages past
    it are never read (poisoning them changes nothing), and the result is the whole table's."""
    rng = np.random.default_rng(2)
    page = 16  # several widths in a block: STEP_TOKENS // page pages each
    pages, step = pa.BLOCK_PAGES, pa.STEP_TOKENS // page
    assert 2 * step < pages
    k_pool = rng.standard_normal((2 * pages, page, KV, D)).astype(np.float32)
    v_pool = rng.standard_normal((2 * pages, page, KV, D)).astype(np.float32)
    tables = jnp.asarray(rng.permutation(2 * pages).reshape(2, pages), jnp.int32)
    furthest = step * page + 2  # into the second width: 2 * step pages are read
    positions = jnp.asarray([[furthest - 1, furthest], [3, 4]], jnp.int32)  # two rows of a 2-token chunk
    q = jnp.asarray(rng.standard_normal((2, 2, KV * GROUP, D)), jnp.float32)
    attend = jax.jit(pa.paged_attention)
    clean = attend(q, jnp.asarray(k_pool), jnp.asarray(v_pool), tables, positions)
    whole = one_gather(q, jnp.asarray(k_pool), jnp.asarray(v_pool), tables, positions)
    np.testing.assert_allclose(np.asarray(clean), np.asarray(whole), atol=1e-6)
    unread = np.asarray(tables)[:, 2 * step:].ravel()
    k_pool[unread], v_pool[unread] = np.nan, np.nan
    poisoned = attend(q, jnp.asarray(k_pool), jnp.asarray(v_pool), tables, positions)
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))
