"""`rsdjax shard-report`: logical axes -> PartitionSpec -> bytes per device, for every parameter.

Computed from abstract shapes, so a 405B model is checked on a laptop without any memory.
"""
from __future__ import annotations

import json

from rsdjax.cli.common import add_mesh_args, add_overrides, split_overrides


def register(sub) -> None:
    p = sub.add_parser("shard-report", help="print the sharding of every parameter and memory per device")
    p.add_argument("--model", required=True, help="model preset (configs/models), YAML file, or checkpoint directory")
    p.add_argument("--mode", choices=["infer", "train"], default="infer", help="which rule table")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_mesh_args(p, default_hardware=None)
    add_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from rsdjax.config import load_model_config
    from rsdjax.hardware import format_mesh, load_hardware
    from rsdjax.loading import abstract_model, read_model_config
    from rsdjax.parallel.mesh import resolve_mesh_shape
    from rsdjax.parallel.sharding import shard_report, spec_str
    from flax import nnx

    model_over = split_overrides(args.overrides, "model")
    hw_over = split_overrides(args.overrides, "hardware")
    if Path(args.model).is_dir():
        from rsdjax.config import apply_overrides
        cfg = apply_overrides(read_model_config(args.model), model_over).validate()
    else:
        cfg = load_model_config(args.model, model_over)
    hardware = load_hardware(args.hardware or "cpu", hw_over)
    mesh_shape = resolve_mesh_shape(args.mesh, None if args.mesh else hardware.name, overrides=hw_over,
                                    num_devices=hardware.num_devices if args.mesh else None)
    _, state = nnx.split(abstract_model(cfg))
    rows = shard_report(state, mesh_shape, args.mode)
    total = sum(r.bytes_per_device for r in rows)
    capacity = hardware.device.usable_bytes
    if args.json:
        print(json.dumps({
            "model": cfg.name, "hardware": hardware.name, "mesh": mesh_shape, "mode": args.mode,
            "params": [{"name": r.name, "shape": r.shape, "dtype": r.dtype, "logical": r.logical,
                        "spec": spec_str(r.spec), "bytes_per_device": r.bytes_per_device} for r in rows],
            "total_bytes_per_device": total, "device_bytes": capacity, "fits": total <= capacity}, indent=2))
        return 0
    print(f"model {cfg.name}: {cfg.num_params() / 1e9:.3f} B params   hardware {hardware.name}   "
          f"mesh {format_mesh(mesh_shape)}   rules {args.mode}")
    header = f"{'parameter':<12} {'shape':<24} {'dtype':<8} {'logical axes':<40} {'PartitionSpec':<34} {'per device':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        logical = "(" + ", ".join(str(a) for a in r.logical) + ")"
        print(f"{r.name:<12} {str(list(r.shape)):<24} {r.dtype:<8} {logical:<40} {spec_str(r.spec):<34} "
              f"{_gb(r.bytes_per_device):>12}")
    print("-" * len(header))
    verdict = "fits" if total <= capacity else "DOES NOT FIT"
    print(f"weights per device: {_gb(total)} of {_gb(capacity)} usable on {hardware.device.name} -> {verdict}")
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"
