"""Many LoRA adapters served at once: stacked on the device, each batch row picking its own.

`AdapterPool` keeps, for every layer and every projection, A `[in..., max_loras, max_rank]` and B
`[max_loras, max_rank, out...]` (the adapter's scale folded into B; the layouts are the ones
`rsdjax.model.lora_rows` multiplies without copying). Pool entry i (1..max_loras) is row i - 1;
entry 0, the base model, takes no room. An adapter of smaller rank is zero-padded (zero columns add
nothing), a projection or layer it does not adapt stays zero. The engine hands the pool and one
entry per batch row to its jitted steps, and `lora_rows_delta` adds each row's own low-rank term
(Punica / S-LoRA), so any mix of adapters and the base runs in one batch, and loading one only
writes new values into arrays of the same shapes: nothing compiles again. A and B carry their
kernel's logical axes (heads / mlp over `tensor`), so they are sharded like the kernels they adapt.

Names are the registry: `acquire(name)` (a request starts) pins the adapter, `release` unpins it;
`unload(name)` removes the name at once (new requests get `UnknownAdapterError`) and frees its entry
only when no request holds it any more, so an adapter is never swapped out under a running request.
Thread-safe: the HTTP handlers load and acquire, the engine thread reads.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from rsdjax.model.llama import resolve_dtype
from rsdjax.model.lora import TARGET_MODULES, lora_axes
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import INFER_RULES, resolve

ADAPTERS_AXIS = "lora_adapters"  # no rule maps it: every device holds every adapter's slice


class AdapterError(ValueError):
    pass


class UnknownAdapterError(AdapterError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclasses.dataclass
class _Entry:
    name: str
    path: str
    rank: int
    users: int = 0
    draining: bool = False


def kernel_shapes(cfg) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{kernel: (input dims, output dims)} of one layer, in the model's layout."""
    from rsdjax.checkpoint.peft import _kernel_shapes

    return _kernel_shapes(cfg)


class AdapterPool:
    def __init__(self, cfg, mesh, max_loras: int, max_rank: int):
        if max_loras < 1 or max_rank < 1:
            raise AdapterError(f"max_loras and max_lora_rank must be >= 1, got {max_loras} and {max_rank}")
        self.cfg, self.mesh, self.max_loras, self.max_rank = cfg, mesh, int(max_loras), int(max_rank)
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}  # pool index (1..max_loras) -> adapter
        self._names: dict[str, int] = {}  # live names only (an unloaded, draining adapter has none)
        self.loads = 0
        n = self.max_loras
        mesh_shape = mesh_shape_of(mesh)
        self._shardings, self._shapes = {}, {}
        for kernel, (ins, outs) in kernel_shapes(cfg).items():
            a_axes, b_axes = lora_axes(kernel)
            a_shape, b_shape = (*ins, n, self.max_rank), (n, self.max_rank, *outs)
            a_axes = (*a_axes[1:-1], ADAPTERS_AXIS, a_axes[-1])  # the kernel's input axes, entries, rank
            b_axes = (ADAPTERS_AXIS, *b_axes[1:])
            self._shapes[kernel] = (a_shape, b_shape)
            self._shardings[kernel] = tuple(
                NamedSharding(mesh, resolve(axes, shape, mesh_shape, INFER_RULES, name=f"lora {kernel}.{which}"))
                for axes, shape, which in ((a_axes, a_shape, "A"), (b_axes, b_shape, "B")))
        # the compute dtype: the step would cast float32 factors to it anyway (same values, half the bytes in bf16)
        dtype = resolve_dtype(cfg.dtype)
        self.layers: list[dict] = [
            {k: {"a": jax.device_put(jnp.zeros(self._shapes[k][0], dtype), self._shardings[k][0]),
                 "b": jax.device_put(jnp.zeros(self._shapes[k][1], dtype), self._shardings[k][1])}
             for k in TARGET_MODULES} for _ in range(cfg.num_layers)]
        # one jitted writer per entry axis: (stack, row, value) -> stack with that row replaced
        self._write = jax.jit(lambda stack, i, v, axis: jax.lax.dynamic_update_index_in_dim(
            stack, v.astype(stack.dtype), i, axis), static_argnums=3)

    # ------------------------------------------------------------ the registry

    def names(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(e.name, e.path) for i, e in sorted(self._entries.items()) if not e.draining]

    def acquire(self, name: str) -> int:
        with self._lock:
            index = self._names.get(name)
            if index is None:
                raise UnknownAdapterError(f"LoRA adapter {name!r} is not loaded")
            self._entries[index].users += 1
            return index

    def release(self, index: int) -> None:
        with self._lock:
            entry = self._entries.get(index)
            if entry is None:
                return
            entry.users -= 1
            if entry.draining and entry.users <= 0:
                del self._entries[index]

    def unload(self, name: str) -> None:
        with self._lock:
            index = self._names.pop(name, None)
            if index is None:
                raise UnknownAdapterError(f"LoRA adapter {name!r} is not loaded")
            entry = self._entries[index]
            entry.draining = True
            if entry.users <= 0:
                del self._entries[index]

    def load(self, name: str, path: str | Path) -> int:
        """Read a PEFT adapter directory and write it into a free entry; returns the entry's index."""
        from rsdjax.checkpoint.peft import read_adapter_config, read_adapter_weights

        config = read_adapter_config(path)
        if config.r > self.max_rank:
            raise AdapterError(f"{path}: rank {config.r} is larger than --max-lora-rank {self.max_rank}")
        weights, _ = read_adapter_weights(path, config, self.cfg)  # checked against the base's shapes
        with self._lock:
            if name in self._names:
                raise AdapterError(f"LoRA adapter {name!r} is already loaded")
            free = [i for i in range(1, self.max_loras + 1) if i not in self._entries]
            if not free:
                raise AdapterError(f"all {self.max_loras} adapter entries are in use (--max-loras); unload one first")
            index = free[0]
            self._entries[index] = _Entry(name, str(path), config.r, draining=True)  # reserved, not yet visible
        try:
            self._write_entry(index, weights, config.r, config.scaling)
        except BaseException:
            with self._lock:
                del self._entries[index]
            raise
        with self._lock:
            self._entries[index].draining = False
            self._names[name] = index
            self.loads += 1
        return index

    def _write_entry(self, index: int, weights: dict, rank: int, scaling: float) -> None:
        i = jnp.int32(index - 1)  # entry 0 (the base) is not stored
        for kernel in TARGET_MODULES:
            (a_shape, b_shape) = self._shapes[kernel]
            n_in = len(a_shape) - 2
            a = np.zeros((self.cfg.num_layers, *a_shape[:n_in], self.max_rank), np.float32)
            b = np.zeros((self.cfg.num_layers, *b_shape[1:]), np.float32)
            if kernel in weights:
                wa, wb = weights[kernel]  # [L, in..., r], [L, r, out...]; rows of layers not adapted are 0
                a[..., :rank] = wa
                b[:, :rank] = np.asarray(wb) * scaling
            for layer in range(self.cfg.num_layers):
                arrays = self.layers[layer][kernel]
                # replace the entry's values in new arrays: a step already running keeps the old ones
                arrays["a"] = self._write(arrays["a"], i, a[layer], n_in)
                arrays["b"] = self._write(arrays["b"], i, b[layer], 0)

    def bytes_per_adapter(self) -> int:
        itemsize = jnp.dtype(resolve_dtype(self.cfg.dtype)).itemsize
        return sum(itemsize * (math.prod(a) + math.prod(b)) for a, b in self._shapes.values()) \
            * self.cfg.num_layers // self.max_loras
