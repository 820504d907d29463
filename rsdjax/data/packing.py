"""Packing a token stream into fixed-length training windows.

The store is one stream `doc0 EOS doc1 EOS ...`. Window i covers stream[i*T : i*T + T + 1]:
`tokens` are the first T, `targets` the last T (next-token prediction). Documents are packed
back to back, so one window can hold the end of one document and the start of the next:

* `segment_ids` (1, 2, ...) number the documents inside the window; attention never crosses them.
* `positions` restart at 0 at each document start (RoPE sees each document from its beginning;
  a document continued from the previous window starts at 0 as well, as in MaxText and Levanter).
* `loss_mask` is 0 where the input token is EOS: its target is the first token of an unrelated
  document. The model still learns to emit EOS (the target of a document's last token).
"""
from __future__ import annotations

import numpy as np

from rsdjax.data.sources import DataError
from rsdjax.data.store import TokenStore

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def pack_window(stream: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """The batch row for a slice of T + 1 stream tokens."""
    tokens = stream[:-1].astype(np.int32)
    targets = stream[1:].astype(np.int32)
    is_eos = tokens == eos_id
    # a new segment starts after each EOS
    starts = np.concatenate([[True], is_eos[:-1]])
    segment_ids = np.cumsum(starts).astype(np.int32)
    idx = np.arange(tokens.size)
    start_of_segment = np.maximum.accumulate(np.where(starts, idx, 0))
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": (~is_eos).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": (idx - start_of_segment).astype(np.int32),
    }


class PackedWindows:
    """Random-access windows of one token store (a grain data source: `__len__` + `__getitem__`)."""

    def __init__(self, store: TokenStore, seq_len: int, name: str = "source"):
        if seq_len <= 0:
            raise DataError(f"data.seq_len must be positive, got {seq_len}")
        if store.num_tokens < seq_len + 1:
            raise DataError(f"data source '{name}' has {store.num_tokens} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}; add text or lower data.seq_len")
        self.store, self.seq_len, self.name = store, seq_len, name

    def __len__(self) -> int:
        return (self.store.num_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        t = self.seq_len
        return pack_window(np.asarray(self.store.tokens[i * t: i * t + t + 1]), self.store.eos_id)
