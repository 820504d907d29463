"""The token store: every document of a source tokenized once, [BOS where the model adds one] + ids + EOS.

A store lives in `<cache_dir>/<source name>-<key>/` where the key hashes the tokenizer and the
source files (path, size, mtime), so changing either builds a new store and an unchanged source is
never tokenized twice. A store is written to a temporary directory and renamed into place, so a
crash while building leaves no half store behind (and concurrent builders on several hosts agree).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rsdjax.data.sources import DataError, iter_documents
from rsdjax.tokenizer import Tokenizer

STORE_VERSION = 1
TOKENS_FILE = "tokens.u32"
META_FILE = "store.json"
ENCODE_CHUNK = 256  # documents per encode_batch call (tokenizers runs a batch in parallel)


@dataclass
class TokenStore:
    directory: Path
    tokens: np.ndarray  # uint32 memmap [num_tokens]
    num_docs: int
    eos_id: int

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def open(cls, directory: Path) -> "TokenStore":
        meta = json.loads((directory / META_FILE).read_text())
        n = meta["num_tokens"]
        tokens = np.memmap(directory / TOKENS_FILE, dtype=np.uint32, mode="r", shape=(n,)) if n else np.zeros(0, np.uint32)
        return cls(directory, tokens, meta["num_docs"], meta["eos_id"])


def eos_id_of(tok: Tokenizer) -> int:
    """The tokenizer's own EOS (tokenizer_config.json's eos_token), put after every document."""
    eos = tok.eos_id
    if eos is None:
        raise DataError(f"{tok.path}: tokenizer has no EOS token to put between documents "
                        f"(eos_token {tok.special('eos_token')!r} in tokenizer_config.json is not in its vocabulary)")
    return eos


def bos_prefix(tok: Tokenizer) -> list[int]:
    """[BOS] where the model adds one to plain text (add_bos_token), else nothing."""
    return [tok.bos_id] if tok.add_bos else []


def store_key(files: Sequence[Path], tok: Tokenizer) -> str:
    h = hashlib.sha256(f"rsdjax-token-store-v{STORE_VERSION}".encode())
    h.update(tok.hf.to_str().encode())
    h.update(f"|eos={eos_id_of(tok)}|bos={bos_prefix(tok)}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_store(name: str, files: Sequence[Path], tok: Tokenizer, cache_dir: Path) -> TokenStore:
    """Open the store for (files, tokenizer), tokenizing the documents first if it does not exist."""
    if not files:
        raise DataError(f"data source '{name}': its paths match no .txt or .jsonl files")
    eos = eos_id_of(tok)
    bos = bos_prefix(tok)
    final = Path(cache_dir) / f"{name}-{store_key(files, tok)}"
    if (final / META_FILE).exists():
        return TokenStore.open(final)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        num_tokens = num_docs = 0
        with open(tmp / TOKENS_FILE, "wb") as out:
            batch: list[str] = []

            def flush():
                nonlocal num_tokens, num_docs
                for enc in tok.hf.encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray(bos + enc.ids + [eos], np.uint32)
                    out.write(ids.tobytes())
                    num_tokens += ids.size
                    num_docs += 1
                batch.clear()

            for doc in iter_documents(files):
                batch.append(doc)
                if len(batch) == ENCODE_CHUNK:
                    flush()
            flush()
        if num_docs == 0:
            raise DataError(f"data source '{name}': no text in {len(files)} file(s) ({files[0]}, ...); the corpus is empty")
        meta = {"version": STORE_VERSION, "name": name, "num_tokens": num_tokens, "num_docs": num_docs,
                "eos_id": eos, "tokenizer": str(tok.path), "files": [str(f) for f in files]}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).exists():  # a concurrent builder did not win the race either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore.open(final)
