"""Evaluation text -> fixed-shape batch rows, one document at a time.

Each document is encoded as `[prefix] + tokens(text)`, the prefix being the tokenizer's BOS (or
the model's `bos_token_id`), so the model predicts every token of the text, the first included.
A document longer than `seq_len` is cut into windows that overlap by one token: window k predicts
tokens k*T+1 .. k*T+T from the ones before it inside the window, so every text token is predicted
exactly once (the context restarts at each window; HF's "non-overlapping windows" perplexity).
Rows never mix documents; the tail of a row is padding (loss_mask 0, segment 0).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from rsdjax.data.packing import BATCH_KEYS


class EvalDataError(ValueError):
    pass


@dataclasses.dataclass
class TextStats:
    documents: int = 0
    chars: int = 0  # Unicode characters of the texts
    bytes: int = 0  # UTF-8 bytes of the texts
    tokens: int = 0  # tokens of the texts (the prefix token not counted)


def document_prefix(tokenizer, model_cfg=None) -> int:
    """The token each document starts with: the tokenizer's BOS, else the model config's."""
    bos = tokenizer.bos_id
    if bos is None and model_cfg is not None:
        bos = model_cfg.bos_token_id
    if bos is None:
        raise EvalDataError(f"{tokenizer.path}: no BOS token (tokenizer or model config) to start documents with")
    return int(bos)


def document_windows(ids: Sequence[int], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Rows for one document's ids (prefix included): inputs, next-token targets, mask, positions."""
    ids = np.asarray(ids, np.int32)
    rows = []
    for start in range(0, len(ids) - 1, seq_len):
        chunk = ids[start:start + seq_len + 1]
        n = len(chunk) - 1
        row = {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
        row["tokens"][:n] = chunk[:-1]
        row["targets"][:n] = chunk[1:]
        row["loss_mask"][:n] = 1.0
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n)
        rows.append(row)
    return rows


def text_rows(tokenizer, texts: Iterable[str], seq_len: int, prefix: int) -> tuple[list[dict], TextStats]:
    texts = [t for t in texts if t]
    stats = TextStats()
    rows: list[dict] = []
    encoded = tokenizer.hf.encode_batch(texts, add_special_tokens=False) if texts else []
    for text, enc in zip(texts, encoded):
        if not enc.ids:
            continue
        stats.documents += 1
        stats.chars += len(text)
        stats.bytes += len(text.encode("utf-8"))
        stats.tokens += len(enc.ids)
        rows += document_windows([prefix, *enc.ids], seq_len)
    return rows, stats


def stack_batches(rows: list[dict], batch_size: int) -> list[dict[str, np.ndarray]]:
    """[batch_size, T] batches; the last one padded with empty rows (mask 0) so one shape compiles."""
    if not rows:
        return []
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start:start + batch_size]
        empty = {k: np.zeros_like(v) for k, v in part[0].items()}
        part = part + [empty] * (batch_size - len(part))
        out.append({k: np.stack([r[k] for r in part]) for k in BATCH_KEYS})
    return out
