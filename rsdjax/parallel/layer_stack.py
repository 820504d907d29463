"""How the stacked decoder layers run on a mesh: plain scan, pipeline over `stage`, explicit TP, or both.

llama.py asks `custom_runner(cfg)` once per call. None means its own `jax.lax.scan` (XLA partitions
everything from the shardings). Otherwise a `StackRunner` runs the same per-layer function
(`decoder_layer`) inside ONE `jax.shard_map` that is manual over

  `stage`   when the mesh has stage > 1 and cfg.pipeline (default): a GPipe schedule (pipeline.py),
            and then also `data` (each replica pipelines its own rows; this also keeps XLA's SPMD
            partitioner away from the cache scatter under two automatic axes, which it cannot split);
  `tensor`  when cfg.tensor_parallel == "shard_map": explicit psums (tensor_parallel.py);

and leaves every other axis (fsdp; data and tensor when not manual) to the compiler. Only the layer
function crosses this boundary, so this module knows nothing about Llama beyond the argument order of
that function: layer(x, p, cos, sin, mask, kv_write=None, row_reduce=None).

The mesh comes from the `activation_sharding` block around the call, or else from `jax.set_mesh`;
without either the model runs its plain scan (so a config saved with these settings still loads
and runs on one device).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rsdjax.config import ConfigError, ModelConfig
from rsdjax.parallel import pipeline
from rsdjax.parallel.rules import INFER_RULES, Rule, activation_sharding, active_sharding
from rsdjax.parallel.tensor_parallel import TENSOR, TensorParallelHooks, manual_spec, without_axes

DATA = "data"


def _context_mesh():
    """(mesh, rules, constrain_inside) from the caller's context, or None."""
    active = active_sharding()
    if active is not None:
        return active[0], active[1], True
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh, INFER_RULES, False


def custom_runner(cfg: ModelConfig) -> "StackRunner | None":
    ctx = _context_mesh()
    if ctx is None:  # one device (or a caller that placed everything itself): nothing to split
        return None
    mesh, rules, constrain_inside = ctx
    sizes = {a: int(n) for a, n in mesh.shape.items()}
    pipelined = cfg.pipeline and sizes.get(pipeline.STAGE, 1) > 1
    explicit_tp = cfg.tensor_parallel == "shard_map" and sizes.get(TENSOR, 1) > 1
    if not (pipelined or explicit_tp):
        return None
    return StackRunner(cfg, mesh, tuple(rules), sizes, pipelined, explicit_tp, constrain_inside)


@dataclasses.dataclass(frozen=True)
class StackRunner:
    cfg: ModelConfig
    mesh: object  # jax.sharding.Mesh or AbstractMesh
    rules: tuple[Rule, ...]
    sizes: dict[str, int]
    pipelined: bool
    explicit_tp: bool
    constrain_inside: bool

    @property
    def manual(self) -> set[str]:
        axes = {pipeline.STAGE} if self.pipelined else set()
        if self.pipelined and self.sizes.get(DATA, 1) > 1:
            axes.add(DATA)
        return axes | ({TENSOR} if self.explicit_tp else set())

    # ------------------------------------------------------------ specs

    def _param_specs(self, params: dict, param_axes: dict):
        specs = {}
        for name, value in params.items():
            if name in param_axes:
                specs[name] = manual_spec(param_axes[name], value.shape, self.sizes, self.rules, self.manual, name)
            elif self.explicit_tp:
                raise ConfigError(f"tensor_parallel=shard_map: layer parameter '{name}' (e.g. a LoRA adapter) has "
                                  "no logical axes to split by; use tensor_parallel=compiler")
            else:  # anything else stacked per layer (adapters) goes with its layer's stage
                specs[name] = jax.tree.map(lambda _: PartitionSpec(pipeline.STAGE), value)
        return specs

    def _batch_spec(self, batch: int) -> PartitionSpec:
        """Rows split over a manual `data` axis when they divide (batch 1 on data=2 stays whole)."""
        n = self.sizes.get(DATA, 1)
        return PartitionSpec(DATA) if DATA in self.manual and batch % n == 0 else PartitionSpec()

    def _cache_spec(self, cache_axes: Sequence[str], shape) -> PartitionSpec:
        batch_ok = DATA not in self.manual or shape[1] % self.sizes[DATA] == 0
        logical = [a if a != "batch" or batch_ok else None for a in cache_axes]
        return manual_spec(logical, shape, self.sizes, self.rules, self.manual, "kv cache")

    def _hooks(self, param_specs: dict) -> TensorParallelHooks | None:
        if not self.explicit_tp:
            return None
        kv_sharded = TENSOR in tuple(param_specs["wk"])
        return TensorParallelHooks(self.sizes[TENSOR], self.cfg.num_heads, self.cfg.num_kv_heads, kv_sharded)

    def _microbatches(self, batch: int, cached: bool) -> int:
        """`batch` is this data replica's rows; automatic batch axes (fsdp) split them further."""
        shards = math.prod(self.sizes.get(a, 1) for a in _batch_axes(self.rules) if a not in self.manual)
        return pipeline.choose_microbatches(self.cfg.pipeline_microbatches, batch, shards,
                                            self.sizes[pipeline.STAGE], cached)

    def _check_layers(self, params: dict):
        layers = next(iter(jax.tree.leaves(params))).shape[0]
        stages = self.sizes.get(pipeline.STAGE, 1)
        if self.pipelined and layers % stages:
            raise ConfigError(f"pipeline: {layers} layers do not split into {stages} equal stages")

    # ------------------------------------------------------------ entry points

    def forward(self, layer: Callable, x, params: dict, aux: tuple, param_axes: dict):
        """x [B, T, E] through every layer (no cache). aux = (cos, sin, mask), each batch-leading."""
        self._check_layers(params)
        specs = self._param_specs(params, param_axes)
        hooks = self._hooks(specs)
        remat = self.cfg.remat

        kv_write = hooks.select_kv_heads if hooks else None
        row_reduce = hooks.row_reduce if hooks else None

        def stage_fn(p, x, aux, state):
            def body(x, p_layer):
                return layer(x, p_layer, *aux, kv_write=kv_write, row_reduce=row_reduce), None

            body = jax.checkpoint(body) if remat else body
            return jax.lax.scan(body, x, p)[0], state

        def run(x, p, aux):
            return self._schedule(functools.partial(stage_fn, p), x, aux, ())[0]

        rows = self._batch_spec(x.shape[0])
        return self._shard_map(run, (rows, specs, rows), rows)(x, params, aux)

    def cached(self, layer: Callable, x, params: dict, aux: tuple, param_axes: dict,
               k, v, positions, cache_axes: Sequence[str]):
        """x [B, T, E] through every layer, writing keys/values at `positions` into the cache k, v
        [L, B, S, KV, D] (the semantics of llama.py's cache path). Returns (x, k, v)."""
        self._check_layers(params)
        specs = self._param_specs(params, param_axes)
        hooks = self._hooks(specs)
        cache_spec = self._cache_spec(cache_axes, k.shape)
        if hooks and hooks.kv_sharded != (TENSOR in tuple(cache_spec)):
            raise ConfigError("tensor_parallel=shard_map: KV cache and wk/wv must be split over tensor alike")

        def stage_fn(p, x, aux, state):
            return _cached_layers(layer, x, p, aux, state, hooks)

        def run(x, p, aux, kv):
            return self._schedule(functools.partial(stage_fn, p), x, aux, kv)

        rows = self._batch_spec(x.shape[0])
        out = self._shard_map(run, (rows, specs, rows, (cache_spec, cache_spec)), (rows, (cache_spec, cache_spec)))
        y, (k, v) = out(x, params, (*aux, positions), (k, v))
        return y, k, v

    # ------------------------------------------------------------ machinery

    def _schedule(self, stage_fn, x, aux, state):
        """Inside the shard_map: the GPipe schedule over stages, or all local layers at once."""
        if self.pipelined:
            m = self._microbatches(x.shape[0], cached=bool(jax.tree.leaves(state)))
            return pipeline.gpipe(stage_fn, x, aux, state, num_stages=self.sizes[pipeline.STAGE], num_microbatches=m)
        return stage_fn(x, aux, state)

    def _shard_map(self, fn, in_specs, out_specs):
        inner_rules = without_axes(self.rules, self.manual)

        def body(*args):
            if not self.constrain_inside:
                return fn(*args)
            # activation constraints inside name the abstract mesh, whose manual axes XLA must not touch
            with activation_sharding(jax.sharding.get_abstract_mesh(), inner_rules):
                return fn(*args)

        return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, axis_names=self.manual)


def _batch_axes(rules: Sequence[Rule]) -> tuple[str, ...]:
    for name, target in rules:
        if name == "batch":
            return (target,) if isinstance(target, str) else tuple(target or ())
    return ()


def _cached_layers(layer, x, params, aux, kv, hooks):
    """This device's layers with a KV cache; mirrors the cache path of llama.py (write at `positions`,
    attend to everything cached up to each token's own position)."""
    cos, sin, mask, positions = aux
    k_all, v_all = kv
    batch_idx = jnp.arange(x.shape[0])[:, None]

    def body(carry, layer_in):
        x, k_all, v_all = carry
        p, i = layer_in

        def kv_write(k, v):
            nonlocal k_all, v_all
            k_all = k_all.at[i, batch_idx, positions].set(k.astype(k_all.dtype), mode="drop")
            v_all = v_all.at[i, batch_idx, positions].set(v.astype(v_all.dtype), mode="drop")
            return hooks.select_kv_heads(k_all[i], v_all[i]) if hooks else (k_all[i], v_all[i])

        x = layer(x, p, cos, sin, mask, kv_write=kv_write, row_reduce=hooks.row_reduce if hooks else None)
        return (x, k_all, v_all), None

    (x, k_all, v_all), _ = jax.lax.scan(body, (x, k_all, v_all), (params, jnp.arange(k_all.shape[0])))
    return x, (k_all, v_all)
