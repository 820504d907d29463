"""Ahead-of-time check: compile jitted steps with shape-only parameters and read XLA's figures.

Training compiles the real `TrainStep`; inference still compiles the stand-in prefill/decode of
`plan/steps.py` over the model's stacked KV cache (the serving engine's per-layer programs are not
wired here yet).

This is how MaxText checks big configurations without the hardware: every argument is a
`jax.ShapeDtypeStruct` carrying its NamedSharding on a (virtual) mesh, so `jit(...).lower().compile()`
runs XLA's SPMD partitioner and buffer assignment for the real program, per device, without
allocating a single weight. `memory_analysis()` then gives argument / output / temp / aliased bytes
per device and `cost_analysis()` the FLOPs and bytes XLA counts.

The mesh must exist as devices: on a CPU host ask for the hardware's device count of virtual devices
before JAX starts (`rsdjax plan --aot` does; the tests use their 8).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from rsdjax.config import ModelConfig
from rsdjax.loading import abstract_model
from rsdjax.model.llama import CACHE_AXES, KVCache
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import RULES, ShardingError, resolve
from rsdjax.parallel.sharding import state_shardings
from rsdjax.plan import hlo, steps


@dataclasses.dataclass
class CompiledStep:
    """XLA's per-device figures for one compiled program."""

    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    bytes_accessed: float
    collectives: list[hlo.Collective]

    @property
    def peak_bytes(self) -> int:
        """Everything live at once on one device: inputs, outputs and temporaries, donated buffers once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def as_dict(self) -> dict:
        return {"name": self.name, "argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes,
                "temp_bytes": self.temp_bytes, "alias_bytes": self.alias_bytes, "peak_bytes": self.peak_bytes,
                "flops": self.flops, "bytes_accessed": self.bytes_accessed,
                "collective_bytes_per_step": sum(c.bytes_per_step or 0 for c in self.collectives)}


def lenient_sharding(mesh, rules, logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    """Like `constrain`: a dimension the mesh does not divide (batch 1 on data=2) stays replicated."""
    sizes = mesh_shape_of(mesh)
    safe = []
    for name, size in zip(logical, shape):
        try:
            resolve([name], [size], sizes, rules)
            safe.append(name)
        except ShardingError:
            safe.append(None)
    return NamedSharding(mesh, resolve(safe, shape, sizes, rules))


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _figures(name: str, compiled) -> CompiledStep:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return CompiledStep(name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                        int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes),
                        float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                        hlo.collectives(compiled.as_text()))


def abstract_params(cfg: ModelConfig, mesh, rules):
    """(graphdef, {name: ShapeDtypeStruct with its NamedSharding}) for the model on `mesh`."""
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(state, mesh, rules).to_pure_dict()
    return graphdef, _abstract(state.to_pure_dict(), shardings)


def compile_infer(cfg: ModelConfig, mesh, batch: int, seq: int, prompt_len: int,
                  only_decode: bool = False) -> list[CompiledStep]:
    """Prefill of `prompt_len` tokens (one prefill chunk) and one decode step, for `batch` sequences per
    data replica, into a KV cache of `seq` positions (donated, so XLA updates it in place)."""
    rules = RULES["infer"]
    graphdef, params = abstract_params(cfg, mesh, rules)
    total = batch * mesh_shape_of(mesh)["data"]
    cache_dtype = jnp.dtype(cfg.dtype)
    cache_shape = (cfg.num_layers, total, seq, cfg.num_kv_heads, cfg.resolved_head_dim)
    cache_sharding = lenient_sharding(mesh, rules, CACHE_AXES, cache_shape)
    cache = KVCache(*(jax.ShapeDtypeStruct(cache_shape, cache_dtype, sharding=cache_sharding),) * 2)
    cache_out = KVCache(cache_sharding, cache_sharding)
    logits_sharding = lenient_sharding(mesh, rules, ("batch", "act_vocab"), (total, cfg.vocab_size))

    def tokens(t):
        sharding = lenient_sharding(mesh, rules, ("batch", None), (total, t))
        return jax.ShapeDtypeStruct((total, t), jnp.int32, sharding=sharding)

    out = []
    with jax.set_mesh(mesh):
        prefill = jax.jit(steps.make_prefill_step(graphdef, mesh, rules), donate_argnums=(2,),
                          out_shardings=(logits_sharding, cache_out))
        if not only_decode:
            out.append(_figures("prefill", prefill.lower(params, tokens(prompt_len), cache).compile()))
        decode = jax.jit(steps.make_decode_step(graphdef, mesh, rules), donate_argnums=(3,),
                         out_shardings=(logits_sharding, cache_out))
        out.append(_figures("decode", decode.lower(params, tokens(1), tokens(1), cache).compile()))
    return out


def compile_train(cfg: ModelConfig, mesh, batch: int, seq: int, grad_accum: int = 1, trainable=None,
                  optim=None) -> list[CompiledStep]:
    """The training step `rsdjax train` runs (`rsdjax.train.step.TrainStep`: forward, backward with the
    config's remat, gradient accumulation, clipping + AdamW of `trainable`), on `batch` sequences of
    `seq` tokens, the train state donated."""
    from rsdjax.train.config import OptimConfig
    from rsdjax.train.optimizer import make_optimizer
    from rsdjax.train.step import TrainStep

    tx, schedule = make_optimizer(optim or OptimConfig(), 1000)
    step = TrainStep(abstract_model(cfg), tx, mesh, trainable=trainable or nnx.Param, grad_accum=grad_accum,
                     schedule=schedule)
    return [_figures("train_step", step.lower(batch, seq).compile())]


# ------------------------------------------------------------------ the planner's view


def config_for(cfg: ModelConfig, nbytes: int) -> ModelConfig:
    """The model config compiled for a plan: parameters and compute in the planner's dtype."""
    name = "float32" if nbytes == 4 else "bfloat16"
    return dataclasses.replace(cfg, param_dtype=name, dtype=name)


def compile_plan(cfg: ModelConfig, mesh_shape: dict[str, int], wl, only_decode: bool = False) -> list[CompiledStep]:
    """Compile the steps of workload `wl` (cost_model.Workload) on a virtual mesh of `mesh_shape`."""
    from rsdjax.parallel.mesh import make_mesh

    mesh = make_mesh(mesh_shape)
    if wl.mode == "infer":
        return compile_infer(cfg, mesh, wl.batch, wl.seq, wl.chunk_len, only_decode=only_decode)
    return compile_train(cfg, mesh, wl.batch, wl.seq)


def format_aot(plan, steps: list[CompiledStep], dtype: str) -> str:
    """XLA's per-device figures beside the cost model's estimate."""
    est = plan.estimate
    cols = f"{'step':<12}{'arguments':>13}{'outputs':>13}{'temp':>13}{'aliased':>13}{'peak':>13}" \
           f"{'estimate':>13}{'est/XLA':>9}{'XLA GFLOP*':>12}"
    out = [f"AOT compile on a virtual mesh {plan.mesh_str} (shape-only parameters; per device):", cols,
           "-" * len(cols)]
    for s in steps:
        mine = est.step_bytes[s.name]
        out.append(f"{s.name:<12}{_mb(s.argument_bytes):>13}{_mb(s.output_bytes):>13}{_mb(s.temp_bytes):>13}"
                   f"{_mb(s.alias_bytes):>13}{_mb(s.peak_bytes):>13}{_mb(mine):>13}{mine / s.peak_bytes:>9.2f}"
                   f"{s.flops / 1e9:>12.3f}")
    peak = max(s.peak_bytes for s in steps)
    total = est.memory.total
    out.append(f"largest XLA peak {_mb(peak)} vs estimate {_mb(total)}: {total / peak - 1:+.1%}   "
               "(*XLA's cost analysis counts a loop body once, not once per layer)")
    if jax.default_backend() == "cpu" and dtype != "float32":
        out.append("note: XLA:CPU runs bfloat16 matmuls in float32 and keeps float32 copies of the weights it "
                   "multiplies, so its temp bytes overstate an accelerator's; "
                   "cost.dtype=float32 compares like for like")
    return "\n".join(out)


def _mb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"

