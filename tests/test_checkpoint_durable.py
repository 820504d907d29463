"""Checkpoint writes that survive crashes: fsync before every publishing rename, and an HF export
that replaces the previous one only once the new one is complete."""
import os
import types
from pathlib import Path

import pytest

from conftest import tree_digest as digest
from rsdjax.checkpoint import hf
from rsdjax.loading import load_model, save_model
from rsdjax.tokenizer import Tokenizer
from rsdjax.train.loop import export


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir)


@pytest.fixture()
def synced(monkeypatch):
    """The paths os.fsync was called on, and the renames, in order."""
    events = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def record(kind, real):
        def call(src, dst, *a, **kw):
            events.append((kind, str(Path(src).absolute()), str(Path(dst).absolute())))
            return real(src, dst, *a, **kw)
        return call

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", record("rename", rename))
    monkeypatch.setattr(os, "replace", record("replace", replace))
    return events


@pytest.mark.parametrize("writer", ["hf", "native"])
def test_every_file_is_fsynced_before_the_directory_is_renamed_into_place(model, tmp_path, writer, synced):
    out = tmp_path / "out"
    (hf.save_hf(model, out, max_shard_bytes=1 << 16) if writer == "hf" else save_model(model, out))
    published = next(i for i, e in enumerate(synced) if e[0] == "rename" and e[2] == str(out))
    tmp = synced[published][1]
    before = {e[1] for e in synced[:published] if e[0] == "fsync"}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 3
    for f in files:  # each file, under its temporary name, reached the disk before the rename
        assert tmp + str(f)[len(str(out)):] in before, f
    assert ("fsync", str(tmp_path)) in synced[published:]  # and the rename itself did


def test_hf_export_keeps_the_previous_one_until_the_new_one_is_complete(model, tmp_path, tiny_tokenizer_dir,
                                                                        monkeypatch):
    cfg = types.SimpleNamespace(run_dir=str(tmp_path), export_hf=True)
    tok = Tokenizer.load(tiny_tokenizer_dir)
    export(cfg, model, tok, lambda msg: None)
    hf_dir = tmp_path / "hf"
    before = digest(hf_dir)
    assert (hf_dir / "config.json").exists()

    real_add = hf.ShardedWriter.add
    calls = []

    def failing_add(self, name, array):
        calls.append(name)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        return real_add(self, name, array)

    monkeypatch.setattr(hf.ShardedWriter, "add", failing_add)
    with pytest.raises(OSError, match="No space left"):
        export(cfg, model, tok, lambda msg: None)
    assert digest(hf_dir) == before  # the failed export did not touch the previous one
    monkeypatch.setattr(hf.ShardedWriter, "add", real_add)
    export(cfg, model, tok, lambda msg: None)  # a good one replaces it and leaves no debris
    assert digest(hf_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model"]
