"""`rsdjax shard-report`: logical axes -> PartitionSpec -> bytes per device, for every parameter.

Computed from abstract shapes, so a 405B model is checked on a laptop without any memory.
"""
from __future__ import annotations

import dataclasses
import json

from rsdjax.cli.common import HARDWARE, MODEL, add_mesh_args, add_overrides, split_overrides


def register(sub) -> None:
    p = sub.add_parser("shard-report", help="print the sharding of every parameter and memory per device")
    p.add_argument("--model", required=True, help="model preset (configs/models), YAML file, or checkpoint directory")
    p.add_argument("--mode", choices=["infer", "train"], default="infer", help="which rule table")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--png", help="draw the shards to this PNG: a bar per device, every parameter, KV cache and "
                                 "activations stacked, the device memory line")
    p.add_argument("--html", help="the same picture and its numbers as one self-contained HTML page")
    p.add_argument("--batch", type=int, default=None,
                   help="for the picture's KV cache / activations: sequences per replica (infer, default 1; 0: the "
                        "largest that fits) or global batch (train, default: the device count)")
    p.add_argument("--seq", type=int, default=None, help="KV cache length (infer, default 4096) or sequence "
                                                         "length (train, default 2048) for the picture")
    add_mesh_args(p, default_hardware=None)
    add_overrides(p, MODEL, HARDWARE)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from rsdjax.config import load_model_config
    from rsdjax.hardware import format_mesh, load_hardware
    from rsdjax.loading import abstract_model, read_model_config
    from rsdjax.parallel.mesh import resolve_mesh_shape
    from rsdjax.parallel.sharding import shard_report, spec_str
    from flax import nnx

    from rsdjax.cli.common import HARDWARE, MODEL, check_overrides

    check_overrides(args.overrides, MODEL, HARDWARE)  # nothing is dropped silently
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
    picture = draw(args, cfg, hardware, mesh_shape, rows) if (args.png or args.html) else None
    if args.json:
        print(json.dumps({
            "model": cfg.name, "hardware": hardware.name, "mesh": mesh_shape, "mode": args.mode,
            "params": [{"name": r.name, "shape": r.shape, "dtype": r.dtype, "logical": r.logical,
                        "spec": spec_str(r.spec), "bytes_per_device": r.bytes_per_device} for r in rows],
            "total_bytes_per_device": total, "device_bytes": capacity, "fits": total <= capacity,
            **({"picture": picture.as_dict()} if picture else {})}, indent=2))
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
    for path in filter(None, (args.png, args.html)):
        print(f"wrote {path}")
    return 0


def draw(args, cfg, hardware, mesh_shape, rows):
    """The picture (written to --png / --html); KV cache and activations from the cost model at this mesh."""
    import math
    from pathlib import Path

    from rsdjax.hardware import format_mesh
    from rsdjax.plan import picture
    from rsdjax.plan.cost_model import DTYPE_BYTES, Assumptions, Workload
    from rsdjax.plan.planner import evaluate

    for path in filter(None, (args.png, args.html)):
        if not Path(path).parent.is_dir():
            raise ValueError(f"cannot write {path}: directory {Path(path).parent} does not exist")
    devices = math.prod(mesh_shape.values())
    infer = args.mode == "infer"
    seq = args.seq or (4096 if infer else 2048)
    batch = args.batch if args.batch is not None else (1 if infer else devices)
    if seq <= 0 or batch < 0 or (batch == 0 and not infer):
        raise ValueError(f"--seq and --batch must be positive, got --seq {seq} --batch {batch}")
    assume = Assumptions.calibrated()
    assume.dtype = cfg.param_dtype if cfg.param_dtype in DTYPE_BYTES else "auto"  # what the rows count
    sized = hardware if devices == hardware.num_devices else dataclasses.replace(
        hardware, devices_per_node=devices, nodes=1)
    plan = evaluate(cfg, sized, mesh_shape, Workload(args.mode, batch, seq), assume)
    extras, what = {}, "weights only"
    if plan.estimate is not None:
        m, wl = plan.estimate.memory, plan.estimate.workload
        extras = {"gradients": m.gradients, "optimizer": m.optimizer, "KV cache": m.kv_cache,
                  "activations": m.activations}
        what = (f"batch {wl.batch} per replica, KV cache {wl.seq}" if infer else f"global batch {wl.batch} x {wl.seq}")
    title = f"{cfg.name} on {hardware.name}, mesh {format_mesh(mesh_shape)}\n{args.mode} rules, {what}"
    pic = picture.build(rows, mesh_shape, hardware.device.usable_bytes, title, extras)
    png = picture.render_png(pic)
    if args.png:
        Path(args.png).write_bytes(png)
    if args.html:
        Path(args.html).write_text(picture.render_html(pic, png), encoding="utf-8")
    return pic


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"
