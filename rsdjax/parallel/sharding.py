"""From a model's logical-axis metadata to NamedShardings, sharded creation, and the shard report."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.rules import RULES, Rule, bytes_per_device, resolve


def as_rules(rules: str | Sequence[Rule]) -> Sequence[Rule]:
    return RULES[rules] if isinstance(rules, str) else rules


def param_name(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def state_specs(state: nnx.State, mesh_shape: dict[str, int], rules: str | Sequence[Rule]):
    """PartitionSpec for every variable in `state` (abstract or concrete), by its `logical_axes`."""
    rules = as_rules(rules)

    def spec(path, var):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            return PartitionSpec()
        return resolve(axes, var.shape, mesh_shape, rules, name=param_name(path))

    return jax.tree.map_with_path(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh, rules: str | Sequence[Rule]):
    specs = state_specs(state, mesh_shape_of(mesh), rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shaped(tree, shardings):
    """Shape-only arrays (`jax.ShapeDtypeStruct`s carrying `shardings`) like `tree`'s leaves: what
    `jit(...).lower()` compiles for without any memory."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def device_bytes(tree) -> int:
    """Bytes one device holds of `tree`'s sharded (shape-only or concrete) arrays."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def is_shape_only(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def from_host(value, sharding):
    """A host array, the same on every process, placed on `sharding`: each process copies only the
    shards its own devices hold. (`jax.device_put` of a host array onto a multi-process sharding also
    all-gathers the whole array to check that every process passed the same value.)"""
    value = np.asarray(value)
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


# Programs that run once per load (random initialisation: a threefry hash and a truncated normal per
# parameter; laying out serving weights: slices, transposes, casts) are not worth LLVM's full
# optimisation on XLA:CPU: level 1 compiles a tiny model's init in 2.2 s instead of 5.3 s, with the
# same values (checked bit for bit).
_ONE_SHOT_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def one_shot_jit(fn, **jit_kwargs):
    """`jax.jit` for a program run once per load: compiled for speed of compiling (see above)."""
    return jax.jit(fn, compiler_options=_ONE_SHOT_OPTIONS.get(jax.default_backend()), **jit_kwargs)


def jit_or_shapes(fn, out_shardings, *args, stored_as: str | None = None):
    """`one_shot_jit(fn, out_shardings=out_shardings)(*args)`, or, when the arguments are shape-only (an
    `abstract_model`'s), the outputs' shapes on `out_shardings` without computing anything: one
    function then lays out concrete weights and abstract ones for the AOT check alike. `stored_as`:
    see `program_or_shapes`."""
    return program_or_shapes(fn, out_shardings, *args, stored_as=stored_as)(*args)


def program_or_shapes(fn, out_shardings, *args, stored_as: str | None = None):
    """`jit_or_shapes` as a callable for arguments shaped like `args`, to run several times. `stored_as`:
    keep the executable whole under that name (rsdjax/stored_executables.py), which must then say
    everything `fn` closes over that the arguments' shapes and shardings do not."""
    if is_shape_only(args):
        outputs = shaped(jax.eval_shape(fn, *args), out_shardings)
        return lambda *_: outputs
    jitted = one_shot_jit(fn, out_shardings=out_shardings)
    if stored_as is None:
        return jitted
    from rsdjax.stored_executables import compiled

    return compiled(stored_as, jitted, *args)


def sharded_abstract_model(model, mesh, rules: str | Sequence[Rule]):
    """An abstract (`nnx.eval_shape`) module whose arrays are ShapeDtypeStructs carrying the shardings
    `rules` give them on `mesh`: a model the size of the mesh's memory, in none of it."""
    graphdef, state = nnx.split(model)
    shardings = nnx.to_pure_dict(state_shardings(state, mesh, rules))
    nnx.replace_by_pure_dict(state, shaped(nnx.to_pure_dict(state), shardings))
    return nnx.merge(graphdef, state)


def create_sharded(make_module, mesh, rules: str | Sequence[Rule]):
    """Build an NNX module with every parameter created directly on its shard (no full copy anywhere)."""
    abstract = nnx.eval_shape(make_module)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    @jax.jit
    def init():
        return jax.lax.with_sharding_constraint(nnx.state(make_module()), shardings)

    with jax.set_mesh(mesh):
        state = one_shot_jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


@dataclasses.dataclass
class ParamRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    logical: tuple[str | None, ...]
    spec: PartitionSpec
    bytes_total: int
    bytes_per_device: int


def shard_report(abstract_state: nnx.State, mesh_shape: dict[str, int], rules: str | Sequence[Rule]) -> list[ParamRow]:
    """One row per parameter: logical axes, PartitionSpec and bytes per device, from shapes alone."""
    rules = as_rules(rules)
    rows = []
    leaves = jax.tree.leaves_with_path(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        name = param_name(path)
        logical = tuple(var.get_metadata().get("logical_axes") or (None,) * len(var.shape))
        spec = resolve(logical, var.shape, mesh_shape, rules, name=name)
        itemsize = jnp.dtype(var.dtype).itemsize
        total = int(itemsize * math.prod(var.shape))
        rows.append(ParamRow(name, tuple(var.shape), str(jnp.dtype(var.dtype)), logical, spec, total,
                             bytes_per_device(var.shape, itemsize, spec, mesh_shape)))
    return rows


def spec_str(spec: PartitionSpec) -> str:
    parts = []
    for entry in spec:
        parts.append("None" if entry is None else entry if isinstance(entry, str) else "(" + ",".join(entry) + ")")
    return "P(" + ", ".join(parts) + ")"
