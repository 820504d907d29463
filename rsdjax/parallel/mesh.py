"""Device meshes over the axes (data, stage, fsdp, tensor), on real or virtual CPU devices."""
from __future__ import annotations

import math
import os

from rsdjax.config import ConfigError
from rsdjax.hardware import MESH_AXES, complete_mesh_shape, format_mesh, load_hardware, parse_mesh


class DeviceCountError(ConfigError):
    pass


def request_cpu_devices(n: int) -> None:
    """Ask XLA:CPU for `n` virtual devices. Must run before JAX creates its backends.

    Asks for at least 8 (the default `cpu` hardware), so later meshes in the same process fit too;
    only ever raises the count. `make_mesh` reports a clear error if the backend started with fewer.
    """
    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return  # the user (or the test harness) chose already; respect it
    try:
        current = jax.config.jax_num_cpu_devices
        if current is None or current < max(n, 8):
            jax.config.update("jax_num_cpu_devices", max(n, 8))
    except RuntimeError:
        pass  # backend already initialised; make_mesh will say how to get more devices


def resolve_mesh_shape(mesh: str | dict | None = None, hardware: str | None = None,
                       num_devices: int | None = None, overrides: list[str] = ()) -> dict[str, int]:
    """A full {axis: size} from `--mesh` text/dict, or from a hardware preset's default mapping."""
    if mesh is not None and hardware is not None and hardware != "cpu":
        raise ConfigError("give either --mesh or --hardware, not both")
    if mesh is not None:
        partial = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
        if num_devices is None:
            num_devices = math.prod(v for v in partial.values() if v > 0) if -1 not in partial.values() else None
        if num_devices is None:  # "-1 = the rest": of 8 virtual devices on a CPU, else of what exists
            import jax

            request_cpu_devices(8)
            num_devices = jax.device_count()
        return complete_mesh_shape(partial, num_devices)
    spec = load_hardware(hardware or "cpu", overrides)
    return spec.mesh_shape()


def make_mesh(shape: dict[str, int]):
    """A `jax.sharding.Mesh` with all four axes (size-1 axes included, so specs never go stale)."""
    import jax
    from jax.sharding import AxisType

    shape = complete_mesh_shape(shape, math.prod(v for v in shape.values() if v > 0))
    needed = math.prod(shape.values())
    have = jax.device_count()
    if needed > have:
        hint = (f"set XLA_FLAGS=--xla_force_host_platform_device_count={needed} (or jax_num_cpu_devices) "
                "before JAX starts" if jax.default_backend() == "cpu" else "use a smaller mesh")
        raise DeviceCountError(f"mesh {format_mesh(shape)} needs {needed} devices but {have} exist; {hint}")
    sizes = tuple(shape[a] for a in MESH_AXES)
    devices = jax.devices()[:needed]
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_from_args(mesh: str | dict | None = None, hardware: str | None = None, overrides: list[str] = ()):
    """Build a mesh for a CLI command, requesting the virtual CPU devices it needs first."""
    shape = resolve_mesh_shape(mesh, hardware, overrides=overrides)
    request_cpu_devices(math.prod(shape.values()))
    return make_mesh(shape)


def mesh_shape_of(mesh) -> dict[str, int]:
    return {a: int(mesh.shape[a]) for a in MESH_AXES}
