"""Tensor parallelism written out by hand with `jax.shard_map` (Megatron style).

Inside the shard_map each device holds a slice of the heads and of the MLP width:

  column-parallel in   wq, wk, wv [E, H/n, D] and w_gate, w_up [E, M/n]: no communication;
  row-parallel out     wo [H/n, D, E] and w_down [M/n, E] give partial sums of the residual update,
                       completed by ONE psum over `tensor` per block (attention, MLP): 2 per layer.

This is the same math XLA derives from the shardings ("compiler" path); tests check both agree, and
`rsdjax plan --collectives` shows the collectives of either from the compiled HLO.

When `tensor` does not divide the KV heads the rules replicate wk/wv (as vLLM does); every device then
computes all KV heads and `select_kv_heads` hands attention the heads its own query heads use.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rsdjax.config import ConfigError
from rsdjax.parallel.rules import Rule, resolve

TENSOR = "tensor"


def without_axes(rules: Sequence[Rule], axes: set[str]) -> tuple[Rule, ...]:
    """The rule table with mesh axes `axes` struck out: inside shard_map they are manual, so activation
    constraints (which XLA applies to the automatic axes only) must not name them."""
    out = []
    for name, target in rules:
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(a for a in targets if a not in axes)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def manual_spec(logical: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
                rules: Sequence[Rule], manual: set[str], name: str) -> PartitionSpec:
    """The shard_map in/out spec of an array: its resolved PartitionSpec, keeping only manual axes
    (automatic axes such as `data` stay with the compiler)."""
    full = resolve(logical, shape, mesh_shape, rules, name=name)
    entries = []
    for entry in full:
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in axes if a in manual)
        entries.append(kept[0] if len(kept) == 1 else (kept or None))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def psum(x, axis: str):
    """`jax.lax.psum`, except that XLA:CPU sums bfloat16 in float32: its all-reduce promotion pass
    aborts on a bfloat16 all-reduce inside a partially manual shard_map (jax 0.10.2)."""
    if x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jax.lax.psum(x.astype(jnp.float32), axis).astype(x.dtype)
    return jax.lax.psum(x, axis)


@dataclasses.dataclass(frozen=True)
class TensorParallelHooks:
    """What the decoder layer needs inside the tensor-manual shard_map.

    num_heads/num_kv_heads are global counts; `kv_sharded` says whether wk/wv are split over `tensor`.
    """

    size: int
    num_heads: int
    num_kv_heads: int
    kv_sharded: bool

    def __post_init__(self):
        if self.num_heads % self.size:
            raise ConfigError(
                f"tensor_parallel=shard_map: {self.num_heads} query heads do not split over tensor={self.size}")
        if not self.kv_sharded:
            local, group = self.num_heads // self.size, self.num_heads // self.num_kv_heads
            if local % group and group % local:
                raise ConfigError(f"tensor_parallel=shard_map: {local} query heads per device cannot share "
                                  f"whole KV groups of {group}")

    @staticmethod
    def row_reduce(y):
        """The one collective per block: sum the row-parallel partial results over `tensor`."""
        return psum(y, TENSOR)

    def select_kv_heads(self, k, v):
        """k, v [B, S, KV, D] with all KV heads -> the heads this device's query heads attend with."""
        if self.kv_sharded:
            return k, v
        local, group = self.num_heads // self.size, self.num_heads // self.num_kv_heads
        count = max(1, local // group)
        start = jax.lax.axis_index(TENSOR) * local // group
        pick = lambda a: jax.lax.dynamic_slice_in_dim(a, start, count, axis=2)  # noqa: E731
        return pick(k), pick(v)
