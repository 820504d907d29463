"""Ahead-of-time check: compile the programs that run, with shape-only parameters, and read XLA's figures.

Training compiles `rsdjax.train.step.TrainStep` (accumulation, remat, the stage's trainable set);
inference compiles the serving engine's own jitted prefill and decode (`rsdjax.infer.steps`) over
its serving weights, derived from the abstract model by the same `serving_weights` the engine uses.

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

import jax
import numpy as np

from rsdjax.config import ModelConfig
from rsdjax.loading import abstract_model
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.sharding import device_bytes, shaped, sharded_abstract_model
from rsdjax.plan import hlo


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
    resident_bytes: int = 0  # buffers on the device that the program does not take (the engine's cache during prefill)

    @property
    def peak_bytes(self) -> int:
        """Everything live at once on one device: inputs, outputs, temporaries and resident buffers,
        donated buffers once."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes + self.resident_bytes

    def as_dict(self) -> dict:
        return {"name": self.name, "argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes,
                "temp_bytes": self.temp_bytes, "alias_bytes": self.alias_bytes,
                "resident_bytes": self.resident_bytes, "peak_bytes": self.peak_bytes,
                "flops": self.flops, "bytes_accessed": self.bytes_accessed,
                "collective_bytes_per_step": sum(c.bytes_per_step or 0 for c in self.collectives)}


def _figures(name: str, compiled, resident: int = 0) -> CompiledStep:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return CompiledStep(name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                        int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes),
                        float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                        hlo.collectives(compiled.as_text()), resident)


def compile_infer(cfg: ModelConfig, mesh, batch: int, seq: int, prompt_len: int,
                  only_decode: bool = False) -> list[CompiledStep]:
    """The serving engine's own prefill and decode (`rsdjax.infer.steps`, the jitted functions a
    `SlotEngine` with `batch` slots per data replica and a `seq`-position KV cache runs), lowered for
    its shape-only serving weights: a prefill of every slot's prompt of `prompt_len` tokens (padded
    to its bucket), and the decode step at its widest attention bucket (the whole cache)."""
    from rsdjax.infer import steps as serving
    from rsdjax.infer.engine import MIN_PREFILL_BUCKET
    from rsdjax.infer.shapes import bucket_for, buckets

    slots = batch * mesh_shape_of(mesh)["data"]
    weights = serving.serving_weights(sharded_abstract_model(abstract_model(cfg), mesh, "infer"), mesh, slots)
    compiled = serving.compiled_steps(cfg, mesh, slots, seq)
    layout = serving.layout(mesh)
    cache = shaped(jax.eval_shape(lambda: layout.empty_cache(cfg, mesh, slots, seq)),
                   layout.cache_shardings(cfg, mesh, slots, seq))

    def host(tree):  # what the engine passes as numpy arrays: replicated on the mesh
        return shaped(tree, jax.tree.map(lambda _: compiled.state_sharding, tree))

    state = host(serving.empty_state(cfg, slots, seq))
    out = []
    if not only_decode:
        rows = 1 << (slots - 1).bit_length()  # as SlotEngine pads a batch of prompts
        length = bucket_for(prompt_len, buckets(MIN_PREFILL_BUCKET, seq))
        args = host((np.zeros((rows, length), np.int32), np.ones(rows, np.int32)))
        lowered = compiled.prefill.lower(weights, *args, None, 0)
        # the engine's KV cache and slot state stay on the device while a prefill runs
        out.append(_figures("prefill", lowered.compile(), device_bytes((cache, state))))
    # the forward (sampling is a program of its own, over [slots, vocab] arrays); the rest of the
    # slot state stays on the device meanwhile
    lowered = compiled.decode.lower(weights, cache, state.tokens, state.positions, None, seq)
    rest = dataclasses.replace(state, tokens=None, positions=None)
    out.append(_figures("decode", lowered.compile(), device_bytes(rest)))
    return out


def compile_train(cfg: ModelConfig, mesh, batch: int, seq: int, grad_accum: int = 1, stage: str = "all",
                  optim=None) -> list[CompiledStep]:
    """The training step `rsdjax train` runs (`rsdjax.train.step.TrainStep`: forward, backward with the
    config's remat, gradient accumulation over `grad_accum` micro-batches, clipping + AdamW of the
    `stage`'s trainable set: "all" or "embeddings"), on a global batch of `batch` sequences of `seq`
    tokens, the train state donated."""
    from rsdjax.train.config import OptimConfig
    from rsdjax.train.loop import STAGE_FILTERS
    from rsdjax.train.optimizer import make_optimizer
    from rsdjax.train.step import TrainStep

    tx, schedule = make_optimizer(optim or OptimConfig(), 1000)
    step = TrainStep(abstract_model(cfg), tx, mesh, trainable=STAGE_FILTERS[stage], grad_accum=grad_accum,
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
    return compile_train(cfg, mesh, wl.batch, wl.seq, grad_accum=wl.grad_accum)


def format_aot(plan, steps: list[CompiledStep], dtype: str) -> str:
    """XLA's per-device figures beside the cost model's estimate."""
    est = plan.estimate
    cols = f"{'step':<12}{'arguments':>13}{'outputs':>13}{'temp':>13}{'aliased':>13}{'resident':>13}" \
           f"{'peak':>13}{'estimate':>13}{'est/XLA':>9}{'XLA GFLOP*':>12}"
    out = [f"AOT compile on a virtual mesh {plan.mesh_str} of the programs that run (shape-only parameters; "
           "per device):", cols, "-" * len(cols)]
    for s in steps:
        mine = est.step_bytes[s.name]
        out.append(f"{s.name:<12}{_mb(s.argument_bytes):>13}{_mb(s.output_bytes):>13}{_mb(s.temp_bytes):>13}"
                   f"{_mb(s.alias_bytes):>13}{_mb(s.resident_bytes):>13}{_mb(s.peak_bytes):>13}{_mb(mine):>13}"
                   f"{mine / s.peak_bytes:>9.2f}{s.flops / 1e9:>12.3f}")
    peak = max(s.peak_bytes for s in steps)
    total = est.memory.total
    out.append(f"largest XLA peak {_mb(peak)} vs estimate {_mb(total)}: {total / peak - 1:+.1%}   "
               "(*XLA's cost analysis counts a loop body once, not once per layer)")
    if any(s.resident_bytes for s in steps):
        out.append("resident: the serving engine's KV cache and slot state, on the device while prefill runs "
                   "(not arguments of that program)")
    if jax.default_backend() == "cpu" and dtype != "float32":
        out.append("note: XLA:CPU runs bfloat16 matmuls in float32 and keeps float32 copies of the weights it "
                   "multiplies, so its temp bytes overstate an accelerator's; "
                   "cost.dtype=float32 compares like for like")
    return "\n".join(out)


def _mb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"

