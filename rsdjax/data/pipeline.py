"""Sources -> shuffled, weighted mixture -> global batches placed on the mesh.

grain's `MapDataset` does what it is good at here: a global shuffle by seed that is a pure
function of the index (a new order each epoch), endless repetition, and a weighted mixture of
sources, all random access. Example `i` of the run is `mixture[i]`, so the data position of a
checkpoint is one integer and resuming at step N replays nothing. We do not use grain's
`DataLoader`/iterators: a batch is 8-64 windows sliced from a memmap, cheaper than worker
processes, and each process reads only the rows of the global batch its devices hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from rsdjax.data.packing import BATCH_KEYS, PackedWindows
from rsdjax.data.sources import DataError, expand_paths
from rsdjax.data.store import build_store
from rsdjax.tokenizer import Tokenizer


@dataclass
class SourceInfo:
    name: str
    weight: float
    num_docs: int
    num_tokens: int
    num_windows: int


def _seed(seed: int, i: int) -> int:
    return (seed * 1_000_003 + i * 7919) % (2 ** 32)


class Mixture:
    """Endless, shuffled, weighted mixture of packed sources; `mixture[i]` is one window (a dict)."""

    def __init__(self, windows: Sequence[PackedWindows], weights: Sequence[float], seed: int):
        if not windows:
            raise DataError("data.sources is empty; give at least one source")
        if len(weights) != len(windows) or any(w <= 0 for w in weights):
            raise DataError(f"data source weights must be positive, got {list(weights)}")
        self.windows = list(windows)
        self.weights = [float(w) for w in weights]
        parts = [grain.MapDataset.source(w).shuffle(seed=_seed(seed, i)).repeat() for i, w in enumerate(windows)]
        self.dataset = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, self.weights)
        self.seq_len = windows[0].seq_len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.dataset[int(index)]

    def rows(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Examples start .. start+count-1 stacked into [count, T] arrays."""
        examples = [self[start + j] for j in range(count)]
        return {k: np.stack([e[k] for e in examples]) for k in BATCH_KEYS}

    def info(self) -> list[SourceInfo]:
        total = sum(self.weights)
        return [SourceInfo(w.name, wt / total, w.store.num_docs, w.store.num_tokens, len(w))
                for w, wt in zip(self.windows, self.weights)]


def build_mixture(sources: Sequence, tok: Tokenizer, seq_len: int, cache_dir: Path, seed: int,
                  base_dir: Path | None = None) -> Mixture:
    """`sources`: objects with `name`, `paths`, `weight` (the data config's entries)."""
    windows = []
    for src in sources:
        try:
            files = expand_paths(src.paths, base_dir)
        except DataError as e:
            raise DataError(f"data source '{src.name}': {e}") from None
        store = build_store(src.name, files, tok, Path(cache_dir))
        windows.append(PackedWindows(store, seq_len, src.name))
    return Mixture(windows, [s.weight for s in sources], seed)


def global_batch(mixture: Mixture, start: int, batch_size: int, shardings: dict) -> dict:
    """The global batch of examples start .. start+batch_size-1 as jax Arrays with `shardings`.

    Each process materialises only the rows its own devices hold (`make_array_from_callback`),
    which is what makes the same code right on one host and on many.
    """
    import jax

    cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def rows(sl: slice) -> dict[str, np.ndarray]:
        lo, hi, _ = sl.indices(batch_size)
        if (lo, hi) not in cache:
            cache[(lo, hi)] = mixture.rows(start + lo, hi - lo)
        return cache[(lo, hi)]

    shape = (batch_size, mixture.seq_len)
    return {k: jax.make_array_from_callback(shape, shardings[k], lambda idx, k=k: rows(idx[0])[k][:, idx[1]])
            for k in BATCH_KEYS}
