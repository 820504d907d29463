"""Hardware catalog: device figures (each with its source, or marked unconfirmed) and topologies.

A topology is `nodes x devices_per_node` devices plus a default mapping onto the mesh axes
(data, stage, fsdp, tensor). The mesh axes are where the hardware meets the model.
"""
from __future__ import annotations

import dataclasses
import math

from rsdjax.config import ConfigError, apply_overrides, from_dict, load_yaml, preset_path

MESH_AXES = ("data", "stage", "fsdp", "tensor")


@dataclasses.dataclass
class Figure:
    """One published number: where it comes from, or `unconfirmed: true` when it is an assumption."""

    value: float
    source: str | None = None
    unconfirmed: bool = False
    note: str | None = None


@dataclasses.dataclass
class DeviceSpec:
    name: str
    memory_gb: Figure
    mem_bandwidth_gbs: Figure
    peak_tflops: Figure
    link_gbs: Figure
    power_w: Figure
    reserved_gb: Figure | None = None
    sram_mb: Figure | None = None

    @property
    def usable_bytes(self) -> float:
        reserved = self.reserved_gb.value if self.reserved_gb else 0.0
        return (self.memory_gb.value - reserved) * 1e9


@dataclasses.dataclass
class HardwareSpec:
    name: str
    description: str
    device: DeviceSpec
    devices_per_node: int = 1
    nodes: int = 1
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    node_power_w: Figure | None = None
    system_power_w: Figure | None = None
    inter_node_gbs: Figure | None = None

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.nodes

    @property
    def total_power_w(self) -> float:
        if self.system_power_w:
            return self.system_power_w.value
        if self.node_power_w:
            return self.node_power_w.value * self.nodes
        return self.device.power_w.value * self.num_devices

    def mesh_shape(self) -> dict[str, int]:
        """The default mesh for this hardware: listed axes, the rest 1; must cover every device."""
        shape = complete_mesh_shape(self.mesh, self.num_devices)
        if math.prod(shape.values()) != self.num_devices:
            raise ConfigError(
                f"hardware '{self.name}': mesh {format_mesh(shape)} uses {math.prod(shape.values())} devices, "
                f"but the topology has {self.num_devices}")
        return shape


def complete_mesh_shape(partial: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill absent axes with 1 and one `-1` axis with whatever devices are left."""
    unknown = [k for k in partial if k not in MESH_AXES]
    if unknown:
        raise ConfigError(f"unknown mesh axis '{unknown[0]}' (axes: {', '.join(MESH_AXES)})")
    shape = {axis: int(partial.get(axis, 1)) for axis in MESH_AXES}
    rest = [a for a, n in shape.items() if n == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh: only one axis may be -1, got {', '.join(rest)}")
    bad = [a for a, n in shape.items() if n == 0 or n < -1]
    if bad:
        raise ConfigError(f"mesh: axis '{bad[0]}' has size {shape[bad[0]]}; sizes are positive (or -1 for the rest)")
    if rest:
        known = math.prod(n for n in shape.values() if n != -1)
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices cannot be split with {format_mesh(partial)}")
        shape[rest[0]] = num_devices // known
    return shape


def parse_mesh(text: str) -> dict[str, int]:
    """`data=2,tensor=4` -> {'data': 2, 'tensor': 4}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ConfigError(f"--mesh: '{part}' is not axis=size (e.g. data=2,tensor=4)")
        axis, size = part.split("=", 1)
        try:
            out[axis.strip()] = int(size)
        except ValueError:
            raise ConfigError(f"--mesh: size of '{axis.strip()}' is not an integer: '{size}'") from None
    complete_mesh_shape(out, 1 << 30)  # validates axis names and sizes
    return out


def format_mesh(shape: dict[str, int]) -> str:
    return ",".join(f"{a}={shape[a]}" for a in MESH_AXES if a in shape)


def load_hardware(name_or_path: str, overrides: list[str] = ()) -> HardwareSpec:
    path = preset_path("hardware", name_or_path)
    try:
        spec = from_dict(HardwareSpec, load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(spec, [o.removeprefix("hardware.") for o in overrides])
