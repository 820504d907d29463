"""Zero-copy safetensors reading (np.memmap, bfloat16 included) and a streaming sharded writer.

Why not `safetensors.numpy`: it cannot represent bfloat16, and `safetensors.flax` puts every tensor
on device 0 first. We need host memmaps so each device shard is cut straight from the file.
The format is small and documented: 8-byte little-endian header length, JSON header, raw data.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from rsdjax.checkpoint.durable import publish_file, write_text
from rsdjax.checkpoint.errors import CheckpointError  # noqa: F401  (also importable from here)

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorRef:
    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    def load(self) -> np.ndarray:
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_header(path: Path) -> dict[str, TensorRef]:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors file (header length {n} exceeds file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON: {e})") from None
    start = 8 + n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor '{name}': {info!r}") from None
        if end - begin != dtype.itemsize * int(np.prod(shape)) or start + end > size:
            raise CheckpointError(
                f"{path}: tensor '{name}' is truncated or corrupt (needs bytes {begin}..{end} of the data, "
                f"file has {size - start})")
        refs[name] = TensorRef(path, name, dtype, shape, start + begin)
    return refs


def index_directory(directory: Path) -> dict[str, TensorRef]:
    """Every tensor of an HF checkpoint directory: single file, or shards with an index."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files found")
    refs: dict[str, TensorRef] = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: listed in the index but missing")
        refs.update(read_header(path))
    return refs


class ShardedWriter:
    """Writes tensors in order into files of at most `max_shard_bytes`, then the HF index.

    Files are written under temporary names and renamed at the end, so an interrupted export never
    leaves a directory that looks complete.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory)
        self.max = max_shard_bytes
        self.shards: list[dict[str, np.ndarray]] = [{}]
        self.sizes = [0]

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if self.sizes[-1] and self.sizes[-1] + array.nbytes > self.max:
            self._flush()
        self.shards[-1][name] = array
        self.sizes[-1] += array.nbytes

    def _flush(self) -> None:
        # keep arrays only until written: spill the full shard to a temp file now
        i = len(self.sizes) - 1
        _write_file(self.directory / f".tmp-shard-{i}", self.shards[-1])
        self.shards[-1] = {k: None for k in self.shards[-1]}
        self.shards.append({})
        self.sizes.append(0)

    def close(self, metadata: dict | None = None) -> list[str]:
        n = len(self.sizes)
        last = len(self.sizes) - 1
        _write_file(self.directory / f".tmp-shard-{last}", self.shards[-1])
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for i, name in enumerate(names):
            publish_file(self.directory / f".tmp-shard-{i}", self.directory / name)
            weight_map.update({k: name for k in self.shards[i]})
        if n > 1:
            index = {"metadata": {"total_size": int(sum(self.sizes)), **(metadata or {})}, "weight_map": weight_map}
            write_text(self.directory / "model.safetensors.index.json", json.dumps(index, indent=2))
        return names


def _write_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(arr.tobytes())
