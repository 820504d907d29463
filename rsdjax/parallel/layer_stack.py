"""How the stacked decoder layers run on a mesh: plain scan, pipeline over `stage`, explicit TP, or both.

llama.py asks `custom_runner(cfg)` once per call. None means its own `jax.lax.scan` (XLA partitions
everything from the shardings). Otherwise a `StackRunner` runs the model's own layer loop
(`layer_scan`, handed in as a function) inside ONE `jax.shard_map` that is manual over

  `stage`   when the mesh has stage > 1 and cfg.pipeline (default): a GPipe schedule (pipeline.py),
            and then also `data` (each replica pipelines its own rows; this also keeps XLA's SPMD
            partitioner away from the cache scatter under two automatic axes, which it cannot split);
  `tensor`  when cfg.tensor_parallel == "shard_map": explicit psums (tensor_parallel.py);

and leaves every other axis (fsdp; data and tensor when not manual) to the compiler. Only that
function crosses this boundary, so this module knows nothing about Llama: it places the arrays,
schedules the stages and hands the layer loop the tensor-parallel hooks.

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

    # ------------------------------------------------------------ the entry point

    def run(self, layers_fn: Callable, x, params: dict, aux: tuple, param_axes: dict,
            cache: tuple = (), cache_axes: Sequence[str] = ()):
        """x [B, T, E] through every layer. `layers_fn(params, x, aux, cache, tp) -> (x, cache)` runs a
        group of stacked layers (the model's `layer_scan`); here it runs per stage and tensor shard,
        with `tp` the tensor-parallel hooks (or None). aux: batch-leading arrays (RoPE tables, mask,
        positions) that travel with their microbatch; cache: () or stacked (k, v) [L, B, S, KV, D]."""
        self._check_layers(params)
        specs = self._param_specs(params, param_axes)
        hooks = self._hooks(specs)
        cache_specs = ()
        if cache:
            cache_spec = self._cache_spec(cache_axes, cache[0].shape)
            if hooks and hooks.kv_sharded != (TENSOR in tuple(cache_spec)):
                raise ConfigError("tensor_parallel=shard_map: KV cache and wk/wv must be split over tensor alike")
            cache_specs = (cache_spec,) * len(cache)

        def stage_fn(p, x, aux, state):
            return layers_fn(p, x, aux, state, hooks)

        def run(x, p, aux, state):
            return self._schedule(functools.partial(stage_fn, p), x, aux, state)

        rows = self._batch_spec(x.shape[0])
        return self._shard_map(run, (rows, specs, rows, cache_specs), (rows, cache_specs))(x, params, aux, cache)

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
