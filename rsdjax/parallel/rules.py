"""Logical axis names -> mesh axes: the rule tables and our resolver.

Rules are data: an ordered list of (logical name, mesh axis | tuple of mesh axes | None).
Resolution of one array's logical axes, left to right:
  * rows for the logical name are tried in order; the first that applies wins;
  * mesh axes that are absent, of size 1, or already used by an earlier dimension are dropped;
  * a row whose remaining axes do not divide the dimension falls through to the next row for the
    same name (an explicit fallback in the table); with no row left it is an error that names the
    parameter, its shape, the logical axis and the mesh axis;
  * a name with no row (or a row mapping to None) is replicated.
Flax's own lookup is a plain dict (last rule wins), which cannot express fallbacks.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

from jax.sharding import PartitionSpec

from rsdjax.config import ConfigError

Rule = tuple[str, str | tuple[str, ...] | None]

# Parameters: vocab embed q_heads kv_heads head_dim mlp layers.
# Activations: batch seq act_embed act_heads act_kv_heads act_mlp act_vocab cache_seq.
# The modes differ only in the batch: training also splits it over fsdp (ZeRO-style data parallel).
_SHARED_RULES: tuple[Rule, ...] = (
    ("layers", "stage"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv_heads", None),  # tensor > kv heads: replicate K/V (as vLLM does) instead of failing
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv_heads", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
TRAIN_RULES: tuple[Rule, ...] = (("batch", ("data", "fsdp")),) + _SHARED_RULES
INFER_RULES: tuple[Rule, ...] = (("batch", "data"),) + _SHARED_RULES

RULES = {"train": TRAIN_RULES, "infer": INFER_RULES}


class ShardingError(ConfigError):
    pass


def resolve(logical: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
            rules: Sequence[Rule], name: str = "array") -> PartitionSpec:
    """The PartitionSpec for one array with logical axes `logical` and shape `shape`."""
    if len(logical) != len(shape):
        raise ShardingError(f"{name}: {len(logical)} logical axes {tuple(logical)} for shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, (axis_name, size) in enumerate(zip(logical, shape)):
        rows = [target for key, target in rules if key == axis_name] if axis_name else []
        chosen: tuple[str, ...] = ()
        for i, target in enumerate(rows):
            targets = (target,) if isinstance(target, str) else tuple(target or ())
            live = tuple(a for a in targets if mesh_shape.get(a, 1) > 1 and a not in used)
            if not live and targets:
                continue  # nothing of this row is usable on this mesh: try the next row
            n = math.prod(mesh_shape[a] for a in live)
            if size % n:
                if i + 1 < len(rows):
                    continue
                fits = [d for d in range(1, min(size, 64) + 1) if size % d == 0]
                raise ShardingError(
                    f"{name}: shape {tuple(shape)} dim {dim} (logical '{axis_name}', size {size}) "
                    f"is not divisible by mesh axis {'x'.join(live)}={n}; sizes that divide it: "
                    f"{', '.join(map(str, fits))}")
            chosen = live
            break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def bytes_per_device(shape: Sequence[int], itemsize: int, spec: PartitionSpec, mesh_shape: dict[str, int]) -> int:
    shards = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            shards *= mesh_shape[axis]
    return math.prod(shape) * itemsize // shards


# ---------------------------------------------------------------- activations


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("rsdjax_activation_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules: Sequence[Rule]):
    """Within this block, `constrain` pins activations to the mesh by logical names."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding():
    """(mesh, rules) of the innermost `activation_sharding` block, or None outside one."""
    return _ACTIVE.get()


def constrain(x, logical: Sequence[str | None]):
    """with_sharding_constraint by logical names; a no-op outside `activation_sharding`.

    Dimensions that the mesh does not divide are left replicated (activations have data-dependent
    sizes such as batch 1 on a data=2 mesh; that is not an error, only less parallel).
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    import jax
    from jax.sharding import NamedSharding

    mesh, rules = active
    mesh_shape = {a: int(n) for a, n in mesh.shape.items()}
    safe = [rules_axis if _divides(rules_axis, size, mesh_shape, rules) else None
            for rules_axis, size in zip(logical, x.shape)]
    spec = resolve(safe, x.shape, mesh_shape, rules, name="activation")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _divides(axis_name, size, mesh_shape, rules) -> bool:
    try:
        resolve([axis_name], [size], mesh_shape, rules)
        return True
    except ShardingError:
        return False
