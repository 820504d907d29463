"""The serving forward pass (per-layer weights, per-layer cache) against the model's full forward."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_abs
from infer_support import confident_hf_dir
from rsdjax.infer import forward
from rsdjax.loading import load_model
from rsdjax.parallel.mesh import make_mesh


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(confident_hf_dir(tmp_path_factory))


@pytest.mark.parametrize("layout", sorted(forward.LAYOUTS))
def test_serving_weights_are_the_model_layers(model, layout):
    w = forward.serving_weights(model, make_mesh({}), layout)
    stacked = model.layer_params()
    assert len(w.layers) == model.cfg.num_layers and w.layout == layout
    for i, layer in enumerate(w.layers):
        for name, value in forward.layer_view(layer, layout).items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(stacked[name][i]))
    np.testing.assert_array_equal(np.asarray(w.lm_head).T, np.asarray(model.lm_head[...]))


def test_engines_store_the_mlp_for_their_row_count():
    """One decode row a step: [out, in] (a matrix-vector loop); several: the model's [in, out]."""
    assert forward.layout_for(1) == "matvec" and forward.layout_for(8) == "matmul"
    assert forward.LAYOUTS["matvec"]["w_gate"] == (1, 0) and "w_gate" not in forward.LAYOUTS["matmul"]


def test_cached_decode_logits_equal_full_forward_at_every_step(model):
    """Three prompts of different lengths prefilled together (padded to 16), then 20 decode steps
    with teacher forcing, next to an idle slot; attention windows of 32 and then 64 positions."""
    cfg, mesh = model.cfg, make_mesh({})
    w = forward.serving_weights(model, mesh)
    rng = np.random.default_rng(0)
    lengths, steps, bucket, cache_len = [5, 11, 16], 20, 16, 64
    seqs = [rng.integers(3, cfg.vocab_size, n + steps).astype(np.int32) for n in lengths]
    full = [np.asarray(model(jnp.asarray(s)[None]))[0] for s in seqs]  # [n + steps, V]
    scale = max(np.abs(f).max() for f in full)
    tol = 2e-5 * scale

    tokens = np.zeros((3, bucket), np.int32)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        tokens[i, :n] = s[:n]
    prefill = jax.jit(functools.partial(forward.prefill, cfg))
    logits, pre = prefill(w, tokens, np.array(lengths, np.int32))
    for i, n in enumerate(lengths):
        assert max_abs(logits[i], full[i][n - 1]) < tol, f"prefill logits of prompt {i}"

    empty = forward.empty_cache(cfg, mesh, 4, cache_len)  # slot 3 stays idle
    cache = forward.LayerCache([c.at[:3, :, :bucket].set(p) for c, p in zip(empty.k, pre.k)],
                               [c.at[:3, :, :bucket].set(p) for c, p in zip(empty.v, pre.v)])
    decode = jax.jit(functools.partial(forward.decode, cfg), static_argnums=(4,), donate_argnums=(1,))
    positions = np.array(lengths + [cache_len], np.int32)  # the idle slot writes past the end: dropped
    windows = set()
    for step in range(steps):
        feed = np.array([s[n + step] for s, n in zip(seqs, lengths)] + [0], np.int32)
        attend = 32 if positions[:3].max() < 32 else 64
        windows.add(attend)
        logits, cache = decode(w, cache, feed, positions, attend)
        for i, n in enumerate(lengths):
            assert max_abs(logits[i], full[i][n + step]) < tol, f"step {step}, prompt {i}"
        positions[:3] += 1
    assert windows == {32, 64}


def test_tied_embeddings_use_the_embedding_table_as_head(tmp_path):
    from conftest import make_hf_llama

    make_hf_llama(tmp_path, seed=2, initializer_range=0.3, tie_word_embeddings=True, num_hidden_layers=1)
    model = load_model(tmp_path)
    cfg, mesh = model.cfg, make_mesh({})
    w = forward.serving_weights(model, mesh)
    assert cfg.tie_word_embeddings and w.lm_head is None
    seq = np.arange(3, 12, dtype=np.int32)
    full = np.asarray(model(jnp.asarray(seq)[None]))[0]
    logits, pre = forward.prefill(cfg, w, jnp.asarray(seq[:8])[None], jnp.array([8]))
    assert max_abs(logits[0], full[7]) < 2e-5 * np.abs(full).max()
    cache = forward.LayerCache([c.at[:, :, :8].set(p) for c, p in zip(forward.empty_cache(cfg, mesh, 1, 64).k, pre.k)],
                               [c.at[:, :, :8].set(p) for c, p in zip(forward.empty_cache(cfg, mesh, 1, 64).v, pre.v)])
    logits, _ = forward.decode(cfg, w, cache, jnp.asarray(seq[8:9]), jnp.array([8]), 64)
    assert max_abs(logits[0], full[8]) < 2e-5 * np.abs(full).max()
