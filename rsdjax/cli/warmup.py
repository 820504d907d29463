"""`rsdjax warmup --model PATH [--mesh ...]`: compile an engine's shapes into the persistent cache."""
from __future__ import annotations

import json
import time
from pathlib import Path

from rsdjax.cli.common import MODEL, add_engine_args, add_mesh_args, add_overrides, split_overrides


def register(sub) -> None:
    p = sub.add_parser("warmup", help="compile the inference engine's shapes ahead (fills the compile cache)")
    p.add_argument("--model", type=Path, required=True, help="HF Llama directory or rsdjax checkpoint")
    p.add_argument("--max-slots", type=int, default=8, help="decode slots, as `rsdjax serve` will use")
    p.add_argument("--max-context", type=int, default=None, help="tokens per slot, as `rsdjax serve` will use")
    p.add_argument("--rows", default="1", help="slot engine: prefill batch sizes to compile, comma-separated (default 1)")
    p.add_argument("--logprobs", action="store_true", help="slot engine: also the variants that return logprobs")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights for every projection and the LM head (per-channel scales)")
    add_engine_args(p.add_argument_group("engine (as `rsdjax serve` will use it)"))
    add_mesh_args(p)
    add_overrides(p, MODEL)
    p.set_defaults(func=run)


def run(args) -> int:
    from rsdjax import compile_cache
    from rsdjax.cli.common import engine_options, serving_mesh
    from rsdjax.cli.generate import parse_ids
    from rsdjax.infer.engine import load_engine
    from rsdjax.infer.warmup import compile_all

    from rsdjax.cli.common import MODEL, check_overrides

    check_overrides(args.overrides, MODEL)
    rows = parse_ids(args.rows, "--rows")
    if not rows or min(rows) < 1:
        raise ValueError(f"--rows: '{args.rows}' must list batch sizes >= 1")
    mesh = serving_mesh(args, args.max_slots, args.max_context, split_overrides(args.overrides, "model"))
    t0 = time.perf_counter()
    engine, _ = load_engine(args.model, mesh=mesh, max_slots=args.max_slots, max_context=args.max_context,
                            overrides=split_overrides(args.overrides, "model"), quantize=args.quantize,
                            **engine_options(args))
    if hasattr(engine, "warmup"):  # the paged engine: every step shape (logprobs are a runtime branch)
        shapes = {"step_shapes": engine.warmup()}
    else:
        shapes = compile_all(engine, rows=rows)
    if args.logprobs and not hasattr(engine, "warmup"):
        for name, n in compile_all(engine, rows=rows, logprobs=True).items():
            shapes[name] += n
    out = {"model": str(args.model), "mesh": {k: int(v) for k, v in engine.mesh.shape.items()},
           "max_slots": engine.max_slots, "max_context": engine.max_context, **shapes,
           "wall_s": round(time.perf_counter() - t0, 2), "cache_dir": str(compile_cache.active_dir() or "") or None,
           **compile_cache.stats()}
    print(json.dumps(out))
    return 0
