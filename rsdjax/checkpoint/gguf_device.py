"""A GGUF's tensors dequantized on the device: its raw blocks go to the device as they are in the file
(a Q4_1 tensor is 5 bits a weight) and one compiled program dequantizes, un-permutes and lays out
every parameter, straight onto its sharding.

Why: on the host (`gguf.quants`, then a float32 copy cut per shard and stacked per layer) that work
was 1.1 s of SmolLM2-135M's 1.2 s load, the largest part of a warm `rsdjax generate`. Compiled, it
is one executable read from the compile cache and a few elementwise loops.

Block layouts are ggml's (`block_q8_0`, `block_q4_0`, `block_q4_1`); tests/test_gguf.py checks each
against gguf's and transformers' dequantizers. Other types (the K-quants, Q5_*) have no device
version here: `load_state` returns None and the model loads through the host path (hf.load_hf_state),
as it does when replicating the raw blocks to every device would cost more than EXTRA_COPIES_BYTES.
"""
from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.checkpoint import hf
from rsdjax.checkpoint.gguf import GGUFFile, unpermute
from rsdjax.config import ModelConfig
from rsdjax.parallel.sharding import one_shot_jit
from rsdjax.stored_executables import compiled


def _half(block, offset: int):
    """The float16 field at `offset` of each block, as float32 [..., 1]."""
    return jax.lax.bitcast_convert_type(block[..., offset:offset + 2], jnp.float16).astype(jnp.float32)[..., None]


def _nibbles(qs):
    """16 bytes -> 32 values: ggml puts elements 0-15 in the low nibbles, 16-31 in the high ones."""
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(jnp.float32)


def _q8_0(block):  # f16 d, int8 q[32]: d * q
    return _half(block, 0) * jax.lax.bitcast_convert_type(block[..., 2:], jnp.int8).astype(jnp.float32)


def _q4_0(block):  # f16 d, 4-bit q[32]: d * (q - 8)
    return _half(block, 0) * (_nibbles(block[..., 2:]) - 8.0)


def _q4_1(block):  # f16 d, f16 m, 4-bit q[32]: d * q + m
    return _half(block, 0) * _nibbles(block[..., 4:]) + _half(block, 2)


BLOCKS = {"Q8_0": (34, _q8_0), "Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1)}  # bytes per 32 values
# the raw blocks are replicated to every device of the mesh, and each cuts its own shards; past this
# many bytes of copies beyond the first, the model loads through the host path (shard by shard)
EXTRA_COPIES_BYTES = 2 << 30
PLAIN = ("F32", "F16", "BF16")
TYPES = PLAIN + tuple(BLOCKS)


def dequantize(raw, kind: str):
    """A GGUF tensor's data as the file holds it (`GGUFTensor.data`, any leading axes) -> float32
    [..., values per row]."""
    if kind == "BF16":  # two bytes a value, little-endian
        return jax.lax.bitcast_convert_type(raw.reshape(*raw.shape[:-1], -1, 2), jnp.bfloat16).astype(jnp.float32)
    if kind in PLAIN:
        return raw.astype(jnp.float32)
    size, values = BLOCKS[kind]
    blocks = values(raw.reshape(*raw.shape[:-1], raw.shape[-1] // size, size))
    return blocks.reshape(*raw.shape[:-1], -1)


def load_state(file: GGUFFile, cfg: ModelConfig, abstract_state: dict, shardings: dict, dtype) -> dict | None:
    """Arrays for every variable of `abstract_state` (name -> ShapeDtypeStruct), each on its sharding;
    None when a tensor's type has no device dequantizer (the host path then loads the file)."""
    refs = file.tensor_refs(cfg)
    source = hf.Source(refs, cfg, abstract_state, file.path)  # the shape checks every load makes
    tensors, plans = {}, {}
    for name, var in abstract_state.items():
        parts = [(refs[key], kind) for key, kind, _ in source.expected(name, tuple(var.shape))]
        kinds = {ref.tensor.tensor_type.name for ref, _ in parts}
        if len(kinds) != 1 or not kinds <= set(TYPES):
            return None
        tensors[name] = [ref.tensor.data for ref, _ in parts]
        first, kind = parts[0]
        plans[name] = (kinds.pop(), first.shape, kind, first.heads, tuple(var.shape))
    mesh = next(iter(shardings.values())).mesh
    if sum(t.nbytes for parts in tensors.values() for t in parts) * (mesh.devices.size - 1) > EXTRA_COPIES_BYTES:
        return None  # every device gets all the raw blocks: for a large model on many devices, the host path
    raws = {name: np.stack(parts) if name in hf.LAYER_TENSORS else np.asarray(parts[0])
            for name, parts in tensors.items()}

    def lay_out(raws):
        out = {}
        for name, (qtype, hf_shape, kind, heads, shape) in plans.items():
            lead = raws[name].shape[:-len(hf_shape)] if name in hf.LAYER_TENSORS else ()
            value = dequantize(raws[name], qtype).reshape(*lead, *hf_shape)
            if heads is not None:
                value = unpermute(value, heads)
            value = hf.from_hf(kind, value, cfg)
            if value.shape != shape:  # a vocabulary padded for the mesh: zero rows, masked anyway
                value = jnp.pad(value, [(0, want - have) for have, want in zip(value.shape, shape)])
            out[name] = value.astype(dtype)
        return out

    replicated = {name: NamedSharding(mesh, PartitionSpec()) for name in raws}
    jitted = one_shot_jit(lay_out, in_shardings=(replicated,), out_shardings=shardings)
    # what lay_out closes over, beyond the raw arrays' shapes: the plans, the model's dims, the dtype
    closure = repr((plans, cfg.hidden_size, cfg.resolved_head_dim, jnp.dtype(dtype).name, shardings))
    return compiled(f"gguf_lay_out-{hashlib.sha256(closure.encode()).hexdigest()[:16]}", jitted, raws)(raws)
