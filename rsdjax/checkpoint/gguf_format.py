"""The GGUF container read directly: header, metadata, tensor table; tensor bytes as memory-mapped arrays.

`gguf.GGUFReader` builds one numpy view per metadata element, which for a tokenizer's 49k tokens and
49k merges is seconds per open (3.5 s of SmolLM2's 11 s model load). This reads the same layout
(llama.cpp's GGUF v2/v3: little-endian, strings and counts as uint64) in one pass over a memory map
and gives what rsdjax uses: metadata as Python values (as `ReaderField.contents()` gives them) and,
per tensor, its name, `GGMLQuantizationType`, ggml dims (innermost first) and data (typed for float
and int types, the raw bytes per row for quantized ones, as the reader gives them). Dequantizing stays
with `gguf.quants`. tests/test_gguf.py checks it against `GGUFReader` on the real model.
"""
from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUFValueType -> struct format of a scalar (8 STRING and 9 ARRAY are read apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# tensor types stored as plain numbers; every other type is blocks of bytes (BF16 included, as in gguf)
_PLAIN = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    data: np.ndarray


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"a string of {n} bytes runs past the end of the file at byte {self.pos}")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            sub, count = self.scalar("<I"), self.scalar("<Q")
            if sub in _SCALARS:  # one numpy read for a numeric array (token types, scores)
                dtype = np.dtype(_SCALARS[sub])
                values = np.frombuffer(self.buf, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return values.tolist()
            return [self.value(sub) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind} at byte {self.pos}")
        return self.scalar(_SCALARS[kind])


def read_gguf(path: str | Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata {key: value}, tensors in file order) of a GGUF file; ValueError/struct.error on bad bytes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    cur = _Cursor(buf)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"no GGUF magic (starts with {bytes(buf[:4])!r})")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (rsdjax reads 2 and 3)")
    n_tensors, n_fields = cur.scalar("<Q"), cur.scalar("<Q")
    meta = {}
    for _ in range(n_fields):
        key = cur.string()
        meta[key] = cur.value(cur.scalar("<I"))
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("<Q") for _ in range(cur.scalar("<I")))
        table.append((name, GGMLQuantizationType(cur.scalar("<I")), dims, cur.scalar("<Q")))
    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-cur.pos // alignment) * alignment
    tensors, names = [], set()
    for name, kind, dims, offset in table:
        if name in names:
            raise ValueError(f"tensor '{name}' appears twice")
        names.add(name)
        shape = tuple(reversed(dims))  # numpy order: outermost first
        n = int(np.prod(dims, dtype=np.int64))
        if kind.name in _PLAIN:
            dtype, count = np.dtype(_PLAIN[kind.name]), n
        else:
            block, size = GGML_QUANT_SIZES[kind]
            dtype, count, shape = np.dtype(np.uint8), n * size // block, quant_shape_to_byte_shape(shape, kind)
        data = np.frombuffer(buf, dtype, count, start + offset).reshape(shape)
        tensors.append(GGUFTensor(name, kind, dims, data))
    return meta, tensors
