"""The persistent compile cache of every `rsdjax` command, and no compiling mid-stream in `rsdjax generate`.

Each run is its own process (the cache only shows across processes); the tiny model keeps them short.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# 60 prompt tokens + 10 new ones cross the 64-position attention bucket: a second decode shape
PROMPT = ",".join(str(3 + i % 500) for i in range(60))


def generate(model: Path, cache_dir: Path, *extra: str) -> dict:
    env = {**os.environ, "RSDJAX_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rsdjax.cli", "generate", "--model", str(model), "--prompt-ids", PROMPT,
                           "--max-new-tokens", "10", "--ignore-eos", "--json", *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warmup(model: Path, cache_dir: Path, *extra: str) -> dict:
    env = {**os.environ, "RSDJAX_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "rsdjax.cli", "warmup", "--model", str(model), *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# what `rsdjax warmup --max-slots 1 --max-context 128` compiles: slots: decode at attend 64 and 128,
# prefill at 16..128; paged (8 pages of 16): decode at 1 row and chunks of 16, 32, 64, 128, all attending 8 pages
SHAPES = {"slots": {"decode_shapes": 2, "prefill_shapes": 4}, "paged": {"step_shapes": 5}}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(SHAPES))
def test_warmup_then_generate_loads_everything_from_the_cache_and_a_corrupt_entry_is_recompiled(tiny_hf_dir, tmp_path,
                                                                                                engine):
    cache = tmp_path / "cache"
    shape = ("--max-slots", "1", "--max-context", "128", "--engine", engine)
    filled = warmup(tiny_hf_dir, cache, *shape)
    assert Path(filled["cache_dir"]).parent == cache and filled["cache_hits"] == 0  # cache/build-<digest>
    assert {k: filled[k] for k in SHAPES[engine]} == SHAPES[engine]
    assert filled["compiled"] > 0

    after_warmup = generate(tiny_hf_dir, cache, *shape)["compile"]
    assert after_warmup["at_first_token"]["compiled"] == 0, after_warmup  # all of it was in the cache
    assert after_warmup["mid_stream"] == 0

    warm = generate(tiny_hf_dir, cache, *shape)  # the second run: nothing at all compiles
    assert warm["compile"]["compiled"] == 0, warm["compile"]
    assert warm["compile"]["cache_hits"] == warm["compile"]["executables"] > 0

    if engine == "paged":  # its steps come whole from the store, without tracing (stored_executables.py)
        assert warm["compile"]["stored_hits"] >= 3, warm["compile"]  # decode, a prompt chunk, the sampler
    entries = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(entries) >= warm["compile"]["executables"]
    for entry in entries:  # damage every entry (JAX's and the stored ones): warned, compiled again, same output
        entry.write_bytes(b"not an executable" + entry.read_bytes()[:64])
    healed = generate(tiny_hf_dir, cache, *shape)
    assert healed["compile"]["compiled"] == warm["compile"]["executables"], healed["compile"]
    assert healed["completions"][0]["token_ids"] == warm["completions"][0]["token_ids"]
    # compiling from scratch, every shape the stream needed was ready before its first token
    assert healed["compile"]["mid_stream"] == 0


def test_no_compile_cache_writes_nothing(tiny_hf_dir, tmp_path):
    cache = tmp_path / "cache"
    out = generate(tiny_hf_dir, cache, "--no-compile-cache")
    assert out["compile"]["cache_dir"] is None and out["compile"]["cache_hits"] == 0
    assert out["compile"]["compiled"] > 0 and out["compile"]["mid_stream"] == 0
    assert not cache.exists() or not any(cache.iterdir())


def test_builds_other_than_the_newest_are_pruned(tmp_path):
    """The cache is kept per rsdjax build (its source digest); the KEEP_BUILDS used last stay."""
    from rsdjax import compile_cache

    assert len(compile_cache.build_id()) == 16
    for age, name in enumerate(["build-a", "build-b", "build-c", "build-d"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1_000_000 - age, 1_000_000 - age))  # build-a newest
    (tmp_path / "unrelated").mkdir()
    compile_cache._prune(tmp_path, keep=tmp_path / "build-d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-a", "build-b", "build-d", "unrelated"]


def test_a_stored_executable_round_trips_and_a_damaged_one_is_compiled_again(tmp_path, monkeypatch, capsys):
    """stored_executables.compiled in one process: written on a compile, read back whole (same values,
    the donation kept), one entry per argument signature, a damaged entry reported and rewritten."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rsdjax import compile_cache
    from rsdjax.stored_executables import SUBDIR, compiled

    monkeypatch.setattr(compile_cache, "active_dir", lambda: tmp_path)
    step = jax.jit(lambda x, w: (x @ w + 0.25, jnp.tanh(w).sum()), donate_argnums=(0,))
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)), jnp.float32)
    want = step(jnp.ones((2, 8)), w)
    first = compiled("round_trip", step, jnp.ones((2, 8)), w)
    (entry,) = (tmp_path / SUBDIR).iterdir()
    before = compile_cache.stats()["stored_hits"]
    again = compiled("round_trip", step, jnp.ones((2, 8)), w)
    assert compile_cache.stats()["stored_hits"] == before + 1 and again is not first
    x = jnp.ones((2, 8))
    for got, expected in zip(again(x, w), want):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert x.is_deleted()  # donated, as the jit says
    compiled("round_trip", step, jnp.ones((3, 8)), w)  # another shape, another entry
    assert len(list((tmp_path / SUBDIR).iterdir())) == 2
    entry.write_bytes(b"damaged" + entry.read_bytes()[:32])
    healed = compiled("round_trip", step, jnp.ones((2, 8)), w)
    assert "ignoring the damaged entry" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(healed(jnp.ones((2, 8)), w)[0]), np.asarray(want[0]))
