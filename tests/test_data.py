"""Token store, packing, mixtures and sharded global batches (rsdjax.data)."""
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from rsdjax.data import DataError
from rsdjax.data.packing import BATCH_KEYS, PackedWindows, pack_window
from rsdjax.data.pipeline import Mixture, build_mixture, global_batch
from rsdjax.data.sources import expand_paths, iter_documents
from rsdjax.data.store import build_store
from rsdjax.tokenizer import BOS, EOS


def _write_docs(directory, docs, name="docs.jsonl"):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def test_pack_window_small_example():
    eos = 2
    w = pack_window(np.array([5, 6, eos, 7, 8, 9, eos, 3, 4], np.uint32), eos)
    assert w["tokens"].tolist() == [5, 6, eos, 7, 8, 9, eos, 3]
    assert w["targets"].tolist() == [6, eos, 7, 8, 9, eos, 3, 4]
    assert w["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 3]
    assert w["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert w["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]  # never predict across documents


def test_pack_window_invariants_on_random_streams():
    rng = np.random.default_rng(0)
    eos = 0
    for _ in range(50):
        stream = rng.integers(0, 6, size=rng.integers(2, 40)).astype(np.uint32)
        w = pack_window(stream, eos)
        t = w["tokens"]
        assert np.array_equal(w["targets"][:-1], t[1:])
        for i in range(1, t.size):  # a new segment starts exactly after an EOS
            assert w["segment_ids"][i] == w["segment_ids"][i - 1] + int(t[i - 1] == eos)
            assert w["positions"][i] == (0 if t[i - 1] == eos else w["positions"][i - 1] + 1)
        assert np.array_equal(w["loss_mask"], (t != eos).astype(np.float32))
        assert all(w[k].dtype == (np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS)


def test_store_concatenates_documents_with_eos_and_is_built_once(tmp_path, tok):
    docs = ["最初の文書です。", "The second document.", "三つ目"]
    src = _write_docs(tmp_path / "src", docs)
    store = build_store("s", [src], tok, tmp_path / "cache")
    eos = tok.token_id(EOS)
    assert tok.add_bos  # the Llama-3 convention of rsdjax-trained tokenizers: BOS opens every document
    expected = [i for d in docs for i in [tok.token_id(BOS)] + tok.encode(d) + [eos]]
    assert store.tokens.tolist() == expected and store.num_docs == 3
    mtime = (store.directory / "tokens.u32").stat().st_mtime_ns
    again = build_store("s", [src], tok, tmp_path / "cache")
    assert again.directory == store.directory
    assert (again.directory / "tokens.u32").stat().st_mtime_ns == mtime  # not tokenized twice
    time.sleep(0.01)
    _write_docs(tmp_path / "src", docs + ["four"])  # a changed source gets a new store
    assert build_store("s", [src], tok, tmp_path / "cache").directory != store.directory
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_windows_cover_the_stream(tmp_path, tok):
    docs = [f"document number {i} " * (i + 1) for i in range(20)]
    store = build_store("s", [_write_docs(tmp_path, docs)], tok, tmp_path / "cache")
    win = PackedWindows(store, 16)
    assert len(win) == (store.num_tokens - 1) // 16
    joined = np.concatenate([win[i]["tokens"] for i in range(len(win))])
    assert np.array_equal(joined, store.tokens[: len(win) * 16])
    with pytest.raises(IndexError):
        win[len(win)]


def test_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("text file\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    _write_docs(tmp_path / "sub", ["one", "  ", "two"])
    files = expand_paths([tmp_path])
    assert [f.name for f in files] == ["a.txt", "docs.jsonl"]
    assert list(iter_documents(files)) == ["text file\n", "one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    with pytest.raises(DataError, match="no such file"):
        expand_paths([tmp_path / "missing"])


def test_empty_and_too_small_corpora_are_clear_errors(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="source 'e'.*corpus is empty"):
        build_store("e", expand_paths([tmp_path / "empty"]), tok, tmp_path / "cache")
    with pytest.raises(DataError, match="match no .txt or .jsonl"):
        build_store("n", [], tok, tmp_path / "cache")
    store = build_store("small", [_write_docs(tmp_path / "small", ["tiny"])], tok, tmp_path / "cache")
    with pytest.raises(DataError, match=r"'small' has \d+ tokens, fewer than one window of seq_len \+ 1 = 129"):
        PackedWindows(store, 128, "small")


def _two_sources(tmp_path, tok, weights=(0.9, 0.1), seed=0):
    a = _write_docs(tmp_path / "a", [f"alpha {i} " * 30 for i in range(30)])
    b = _write_docs(tmp_path / "b", [f"beta {i} " * 30 for i in range(30)])
    srcs = [SimpleNamespace(name="a", paths=[a], weight=weights[0]), SimpleNamespace(name="b", paths=[b], weight=weights[1])]
    return build_mixture(srcs, tok, 16, tmp_path / "cache", seed)


def _source_of(example, mixture):
    """Which source a window came from: look it up in each source's windows."""
    for k, win in enumerate(mixture.windows):
        for i in range(len(win)):
            if np.array_equal(win[i]["tokens"], example["tokens"]):
                return k
    raise AssertionError("window not found in any source")


def test_mixture_follows_weights_and_is_deterministic(tmp_path, tok):
    mix = _two_sources(tmp_path, tok)
    n = 400
    counts = np.bincount([_source_of(mix[i], mix) for i in range(n)], minlength=2)
    assert abs(counts[0] / n - 0.9) < 0.03
    again = _two_sources(tmp_path, tok)  # same seed: same order, from a fresh object
    assert all(np.array_equal(mix[i]["tokens"], again[i]["tokens"]) for i in range(50))
    other = _two_sources(tmp_path, tok, seed=1)
    assert not all(np.array_equal(mix[i]["tokens"], other[i]["tokens"]) for i in range(50))


def test_each_epoch_visits_every_window_once_in_a_new_order(tmp_path, tok):
    docs = [" ".join(str(1000 * i + j) for j in range(40)) for i in range(40)]  # every window distinct
    store = build_store("s", [_write_docs(tmp_path, docs)], tok, tmp_path / "c")
    win = PackedWindows(store, 16)
    mix = Mixture([win], [1.0], seed=3)
    n = len(win)
    index = {win[i]["tokens"].tobytes(): i for i in range(n)}
    assert len(index) == n
    epoch0 = [index[mix[i]["tokens"].tobytes()] for i in range(n)]
    epoch1 = [index[mix[n + i]["tokens"].tobytes()] for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != list(range(n)) and epoch0 != epoch1


def test_resume_position_is_random_access(tmp_path, tok):
    """Example N is a pure function of (sources, seed, N): no replay of 0..N-1."""
    mix = _two_sources(tmp_path, tok)
    far = 10 ** 12
    t = time.perf_counter()
    row = mix.rows(far, 4)
    assert time.perf_counter() - t < 1.0
    fresh = _two_sources(tmp_path, tok)
    assert np.array_equal(fresh.rows(far, 4)["tokens"], row["tokens"])


def test_global_batch_is_sharded_and_matches_rows(tmp_path, tok):
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.train.step import batch_sharding

    mix = _two_sources(tmp_path, tok)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharding = batch_sharding(mesh)
    batch = global_batch(mix, 100, 8, {k: sharding for k in BATCH_KEYS})
    rows = mix.rows(100, 8)
    for k in BATCH_KEYS:
        assert batch[k].sharding == sharding and batch[k].shape == (8, 16)
        assert np.array_equal(np.asarray(batch[k]), rows[k])
