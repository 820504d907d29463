"""`rsdjax plan`: rank every mesh split of a hardware preset for a model; check one ahead of time.

  rsdjax plan --model llama3.1-70b --hardware cs3x4
  rsdjax plan --model llama3-8b --hardware atom-rack --scaling
  rsdjax plan --model tiny --hardware cpu --aot              # XLA's memory beside the estimate
  rsdjax plan --model tiny --mesh tensor=4 --mode train --collectives   # psums of both tensor-parallel paths
"""
from __future__ import annotations

import json
import math

from rsdjax.cli.common import COST, HARDWARE, MODEL, add_mesh_args, add_overrides, split_overrides


def register(sub) -> None:
    p = sub.add_parser("plan", help="rank mesh splits for a model on a hardware preset (cost model, AOT check)")
    p.add_argument("--model", help="model preset (configs/models), YAML file, or checkpoint directory "
                                   "(required unless --calibration)")
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--batch", type=int, default=None,
                   help="infer: sequences per replica (default: the largest that fits, <= 256); "
                        "train: global batch (default: the device count)")
    p.add_argument("--seq", type=int, default=None, help="infer: KV cache length (default 4096 = 2K in + 2K out); "
                                                         "train: tokens per sequence (default 2048)")
    p.add_argument("--prompt", type=int, default=0, help="infer: prompt length for TTFT (default seq/2)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="infer: prefill this many tokens at a time (0: all)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="train: run the global batch as this many micro-batches per update (TrainStep's accumulation)")
    p.add_argument("--top", type=int, default=10, help="how many fitting plans to list")
    p.add_argument("--all", action="store_true", help="list every rejected plan with its reason")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--calibration", action="store_true",
                   help="the cost model against the published measurements (configs/measurements): measured, "
                        "predicted, error per point; the other arguments are ignored")
    p.add_argument("--fit", action="store_true", help="with --calibration: refit the constants first (~1 min)")
    p.add_argument("--write", action="store_true", help="with --fit: save them to configs/cost/calibrated.yaml")
    p.add_argument("--scaling", action="store_true", help="best plan for 1 device, 1 node, n nodes .. the whole system")
    p.add_argument("--aot", action="store_true",
                   help="compile the best (or --mesh) plan's steps with shape-only parameters on a virtual mesh; "
                        "print XLA's per-device memory beside the estimate")
    p.add_argument("--collectives", action="store_true",
                   help="compile the step for both tensor-parallel paths (compiler, shard_map) and list the "
                        "collectives in the HLO")
    add_mesh_args(p, default_hardware="cpu")
    add_overrides(p, MODEL, HARDWARE, COST)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import dataclasses

    from rsdjax.config import apply_overrides, load_model_config, to_dict
    from rsdjax.hardware import complete_mesh_shape, load_hardware, parse_mesh
    from rsdjax.plan import report
    from rsdjax.plan.cost_model import Assumptions, Workload
    from rsdjax.plan.planner import evaluate, plan_all, scaling

    if args.calibration or args.fit or args.write:
        return run_calibration(args)
    if not args.model:
        raise ValueError("plan: give --model NAME (or --calibration)")
    from rsdjax.cli.common import COST, HARDWARE, MODEL, check_overrides

    check_overrides(args.overrides, MODEL, HARDWARE, COST)
    hardware = load_hardware(args.hardware, split_overrides(args.overrides, "hardware"))
    if args.aot or args.collectives:
        # virtual devices must be requested before JAX starts its CPU backend
        from rsdjax.parallel.mesh import request_cpu_devices
        request_cpu_devices(hardware.num_devices)
    model_over = split_overrides(args.overrides, "model")
    if Path(args.model).is_dir():
        from rsdjax.loading import read_model_config
        cfg = apply_overrides(read_model_config(args.model), model_over).validate()
    else:
        cfg = load_model_config(args.model, model_over)
    assume = apply_overrides(Assumptions.calibrated(), split_overrides(args.overrides, "cost"))
    assume.validate(hardware)
    seq = args.seq or (4096 if args.mode == "infer" else 2048)
    batch = args.batch if args.batch is not None else (0 if args.mode == "infer" else hardware.num_devices)
    for name, value in (("--seq", seq), ("--batch", batch), ("--prompt", args.prompt),
                        ("--prefill-chunk", args.prefill_chunk), ("--grad-accum", args.grad_accum)):
        if value < 0 or (name in ("--seq", "--grad-accum") and value == 0) or (
                name == "--batch" and args.mode == "train" and value == 0):
            raise ValueError(f"{name} must be positive, got {value}")
    wl = Workload(args.mode, batch, seq, prompt=args.prompt, prefill_chunk=args.prefill_chunk,
                  grad_accum=args.grad_accum)

    if args.mesh:
        mesh = complete_mesh_shape(parse_mesh(args.mesh), hardware.num_devices)
        if math.prod(mesh.values()) != hardware.num_devices:
            raise ValueError(f"--mesh {args.mesh} uses {math.prod(mesh.values())} devices; "
                             f"{hardware.name} has {hardware.num_devices}")
        plans = [evaluate(cfg, hardware, mesh, wl, assume)]
    else:
        plans = plan_all(cfg, hardware, wl, assume, args.objective)
    result = {"model": cfg.name, "hardware": hardware.name, "workload": to_dict(wl), "assumptions": to_dict(assume),
              "plans": [report.plan_dict(cfg, p) for p in plans],
              "best_mesh": plans[0].mesh_str if plans and plans[0].fits else None}
    text = [report.header(cfg, hardware, wl, assume), report.plan_table(cfg, plans, args.mode, args.top, args.all)]

    if args.scaling:
        rows = scaling(cfg, hardware, wl, assume)
        result["scaling"] = [{"topology": r.label, "devices": r.devices, "power_w": r.power_w, "nodes": n,
                              "best": report.plan_dict(cfg, r.best) if r.best else None} for r, n in rows]
        text += ["", "scaling (replicas behind the router):", report.scaling_table(rows)]

    chosen = plans[0] if plans else None
    if (args.aot or args.collectives) and chosen is not None and chosen.estimate is not None:
        from rsdjax.plan import aot
        compiled_cfg = aot.config_for(cfg, assume.dtype_bytes(hardware))
        wl_used = chosen.estimate.workload
        if args.aot:
            steps = aot.compile_plan(compiled_cfg, chosen.mesh, wl_used)
            result["aot"] = {"mesh": chosen.mesh_str, "steps": [s.as_dict() for s in steps],
                             "estimate_bytes": chosen.estimate.memory.total}
            text += ["", aot.format_aot(chosen, steps, compiled_cfg.param_dtype)]
        if args.collectives:
            result["collectives"] = {}
            for path in ("compiler", "shard_map"):
                if path == "shard_map" and wl_used.mode == "infer" and chosen.mesh["stage"] == 1:
                    text += ["", "tensor_parallel=shard_map: not used by the serving engine on a mesh with stage=1 "
                             "(XLA partitions its per-layer programs); training and pipelined serving (stage > 1) "
                             "run it"]
                    continue
                step = aot.compile_plan(dataclasses.replace(compiled_cfg, tensor_parallel=path), chosen.mesh,
                                        wl_used, only_decode=True)[-1]
                result["collectives"][path] = [vars(c) for c in step.collectives]
                from rsdjax.plan.hlo import format_table
                text += ["", f"collectives of the {step.name} step, tensor_parallel={path}, mesh {chosen.mesh_str}:",
                         format_table(step.collectives)]
    print(json.dumps(result, indent=2, default=float) if args.json else "\n".join(text))
    return 0


def run_calibration(args) -> int:
    from rsdjax.config import CONFIG_ROOT
    from rsdjax.plan import calibration
    from rsdjax.plan.cost_model import Assumptions

    if not args.calibration or (args.write and not args.fit):
        raise ValueError("--fit needs --calibration, and --write needs --fit")
    points = calibration.load_points()
    assume = Assumptions.calibrated()
    if args.fit:
        assume = calibration.fit(points, assume)
        if args.write:
            calibration.write(assume, CONFIG_ROOT / "cost" / "calibrated.yaml")
    rows = calibration.compare(points, assume)
    if args.json:
        print(json.dumps({"points": [{"id": r.point.id, "role": r.point.role, "metric": r.point.metric,
                                      "measured": r.point.measured,
                                      **({"predicted": r.predicted, "error": r.error} if r.predicted == r.predicted
                                         else {"predicted": None, "error": None}),
                                      "mesh": r.mesh, "unconfirmed": r.point.unconfirmed} for r in rows],
                          "constants": {calibration.label(k): calibration.get_term(assume, k)
                                        for k in calibration.FITTED}}, indent=2))
    else:
        print(calibration.table(rows, assume))
    return 0
