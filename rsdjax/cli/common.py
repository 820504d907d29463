"""Arguments every command shares: the mesh (or a hardware preset) and `key=value` overrides."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

OBJECTIVES = ("throughput", "latency", "tps-per-watt")  # rsdjax.plan.planner.OBJECTIVES (imported lazily there)
DEFAULT_STEP_TOKENS = 2048  # rsdjax.infer.paged_engine.DEFAULT_STEP_TOKENS (the parser imports no JAX)


def add_mesh_args(parser: argparse.ArgumentParser, default_hardware: str | None = None) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--mesh", help="mesh axis sizes, e.g. data=2,tensor=4 (one axis may be -1 = the rest)")
    g.add_argument("--hardware", default=default_hardware,
                   help="hardware preset (configs/hardware/*.yaml): without --mesh, the split is the planner's "
                        "best for this model and workload on it (printed with the reason)")
    g.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="what --hardware's split maximizes: system tokens/s, lowest step latency, or tokens/s per watt")


# the config sections a command's `key=value` overrides may name (check_overrides)
MODEL = ("model", "rsdjax.config:ModelConfig")
HARDWARE = ("hardware", "rsdjax.hardware:HardwareSpec")
COST = ("cost", "rsdjax.plan.cost_model:Assumptions")


def section_keys(*sections: tuple[str, str]) -> list[str]:
    """Every dotted key of these config sections (prefix, "module:Dataclass"); a prefix "" is the config itself."""
    import importlib

    from rsdjax.config import config_keys

    keys = []
    for prefix, where in sections:
        module, name = where.split(":")
        keys += config_keys(getattr(importlib.import_module(module), name), f"{prefix}." if prefix else "")
    return keys


def check_overrides(overrides: list[str], *sections: tuple[str, str]) -> None:
    """Refuse the first override whose key no section has, naming the nearest valid key."""
    from rsdjax.config import check_keys

    check_keys(list(overrides), section_keys(*sections))


def add_overrides(parser: argparse.ArgumentParser, *sections: tuple[str, str]) -> None:
    """`key=value` arguments; `--help` then lists every key the sections accept (read only when asked for,
    so building the parser imports nothing heavy)."""
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.num_layers=4")
    list_keys_in_help(parser, *sections)


def list_keys_in_help(parser: argparse.ArgumentParser, *sections: tuple[str, str]) -> None:
    """End `--help` with every key the sections accept (computed only when asked for)."""
    if not sections:
        return
    format_help = parser.format_help

    def with_keys() -> str:
        parser.epilog = "config keys (key=value): " + ", ".join(section_keys(*sections))
        return format_help()

    parser.format_help = with_keys


def add_path_arg(parser: argparse.ArgumentParser, dest: str, flags: tuple[str, ...], help: str) -> None:
    """A path given as `--model X` / `-o X` (the grammar every command shares) or, as first written,
    positionally; `path_arg(args, dest)` reads whichever was given."""
    parser.add_argument(f"{dest}_pos", nargs="?", type=Path, metavar=dest.upper(), help=f"{help} (or {flags[-1]})")
    parser.add_argument(*flags, dest=dest, type=Path, default=None, help=help)


def path_arg(args, dest: str) -> Path:
    given = [p for p in (getattr(args, dest), getattr(args, f"{dest}_pos")) if p is not None]
    flag = "--model" if dest == "model" else f"--{dest}"
    if len(given) != 1:
        raise ValueError(f"{args.command}: give {dest.upper()} once ({flag} PATH or positionally)")
    return given[0]


def add_output_override(parser: argparse.ArgumentParser, key: str, help: str) -> None:
    """`-o/--output PATH` for a command whose config names its output (`key=`); `output_override` reads it."""
    parser.add_argument("-o", "--output", type=Path, default=None, help=f"{help} (the config's {key}=)")
    parser.set_defaults(output_key=key)


def output_override(args) -> list[str]:
    """The command's overrides with `-o PATH` as `key=PATH` (given both ways: an error naming both)."""
    if args.output is None:
        return list(args.overrides)
    key = args.output_key
    if any(o.split("=", 1)[0] == key for o in args.overrides):
        raise ValueError(f"{args.command}: give the output once (-o {args.output} or {key}=...)")
    import json

    return [*args.overrides, f"{key}={json.dumps(str(args.output))}"]  # quoted: a path is a string, even "1" or "on"


def split_overrides(overrides: list[str], prefix: str) -> list[str]:
    """The overrides under `prefix.` with the prefix removed (model.x=1 -> x=1)."""
    return [o[len(prefix) + 1:] for o in overrides if o.startswith(prefix + ".")]


def planned_mesh_shape(args, cfg, workload, runnable=None, hardware_overrides: list[str] = ()) -> dict[str, int]:
    """`--hardware NAME` without `--mesh`: the planner's best split that this command can run, printed with
    the reason (stderr, so --json output stays clean)."""
    from rsdjax.hardware import load_hardware
    from rsdjax.plan.planner import choose

    hw = load_hardware(args.hardware, hardware_overrides)
    plan, reason = choose(cfg, hw, workload, objective=getattr(args, "objective", "throughput"), runnable=runnable)
    print(f"--hardware {hw.name}: mesh {plan.mesh_str} for {cfg.name} ({reason}); --mesh overrides it",
          file=sys.stderr)
    return plan.mesh


def pipeline_refusal(args) -> str | None:
    """What in a serving command's arguments the pipelined engine (stage > 1, rsdjax/infer/staged.py) does
    not run, in words (the engine refuses each when loading); None if nothing."""
    if getattr(args, "engine", None) == "paged":
        return "the paged engine (the default; --engine slots pipelines)"
    if getattr(args, "quantize", None):
        return f"--quantize {args.quantize}"
    # serve's --lora NAME=DIR are per-request adapters (it has --max-loras); generate's --lora is applied to
    # the weights before they are split, which a pipeline runs
    if getattr(args, "max_loras", None) is not None and (args.max_loras or args.lora):
        return "per-request LoRA adapters (--lora NAME=DIR, --max-loras)"
    return None


def engine_runnable(max_slots: int | None, args=None):
    """What the serving engine can run: a split whose data axis divides the slots; stage > 1 (a pipeline,
    rsdjax/infer/staged.py) unless these engine arguments need one stage (pipeline_refusal)."""
    refusal = pipeline_refusal(args) if args is not None else None

    def check(mesh: dict[str, int]) -> str | None:
        if max_slots and max_slots % mesh["data"]:
            return f"{max_slots} slots do not split over data={mesh['data']}"
        if refusal and mesh["stage"] > 1:
            return f"{refusal} runs on stage=1 only"
        return None
    return check


def mesh_from_args(args, hardware_overrides: list[str] = (), cfg=None, workload=None, runnable=None):
    """Make the mesh the arguments ask for, setting up virtual CPU devices first when needed. With a model
    config and workload, `--hardware` alone means the planner's best split (planned_mesh_shape)."""
    from rsdjax.parallel.mesh import mesh_from_args as build

    if args.mesh is None and args.hardware and cfg is not None and workload is not None:
        return build(planned_mesh_shape(args, cfg, workload, runnable, hardware_overrides))
    hardware = args.hardware if args.mesh is None else None
    return build(args.mesh, hardware or ("cpu" if args.mesh is None else None), overrides=hardware_overrides)


def distributed_mesh(args, shape: dict[str, int]):
    """The mesh of a command that may run as several processes (`add_distributed_args`; every process runs
    the same command): start jax.distributed when asked, then lay the mesh over all processes' devices."""
    import math

    from rsdjax.distributed import initialize
    from rsdjax.parallel.mesh import make_mesh, request_cpu_devices

    size = math.prod(shape.values())
    if initialize(args.coordinator_address, args.num_processes, args.process_id, args.local_devices,
                  mesh_size=size) == 1:
        request_cpu_devices(size)
    return make_mesh(shape)  # with several processes, devices per process were fixed by initialize


def add_engine_args(group) -> None:
    """The paged engine's options (`rsdjax serve` and `rsdjax generate`), named as vLLM names them."""
    group.add_argument("--engine", choices=["paged", "slots"], default="paged",
                       help="paged (the default): paged KV cache, prefix caching, chunked prefill, preemption; "
                            "slots: one contiguous cache per slot (also pipelines layers over stage > 1)")
    group.add_argument("--page-size", type=int, default=16, help="tokens per KV page (vLLM's block size; 16-128)")
    group.add_argument("--kv-cache-gb", type=float, default=None,
                       help="KV page pool per device in GiB (default: --kv-memory-fraction of the free device "
                            "memory; 1 GiB where the backend reports none, as XLA:CPU)")
    group.add_argument("--kv-memory-fraction", type=float, default=0.9,
                       help="share of the free device memory the page pool takes when --kv-cache-gb is not given")
    group.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the pages of cached prefixes")
    group.add_argument("--max-step-tokens", type=int, default=DEFAULT_STEP_TOKENS,
                       help="tokens per engine step, decode and prompt chunks together (vLLM's max_num_batched_tokens; "
                            f"default {DEFAULT_STEP_TOKENS}, vLLM's on CPU); each prompt adds at most one chunk of <= 256")


def engine_options(args) -> dict:
    """`load_engine` keywords from `add_engine_args` arguments."""
    if args.engine == "slots":
        return {"kind": "slots"}
    if not 0 < args.kv_memory_fraction <= 1:
        raise ValueError(f"--kv-memory-fraction must be in (0, 1], got {args.kv_memory_fraction}")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        raise ValueError(f"--kv-cache-gb must be > 0, got {args.kv_cache_gb}")
    return {"kind": "paged", "page_size": args.page_size, "kv_cache_gb": args.kv_cache_gb,
            "kv_memory_fraction": args.kv_memory_fraction, "prefix_caching": not args.no_prefix_caching,
            "max_step_tokens": args.max_step_tokens}


def serving_mesh(args, max_slots: int | None, max_context: int | None, model_overrides: list[str] = ()):
    """The mesh `serve` and `warmup` run (so a warmed cache matches): --mesh, else --hardware's planned
    split for serving this model at this context; None without either (one device)."""
    if not (args.mesh or args.hardware):
        return None
    from rsdjax.config import apply_overrides
    from rsdjax.loading import read_model_config
    from rsdjax.plan.cost_model import Workload

    from rsdjax.infer.shapes import DEFAULT_MAX_CONTEXT

    cfg = apply_overrides(read_model_config(args.model), list(model_overrides))
    context = max_context or min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)  # the engine's default
    return mesh_from_args(args, cfg=cfg, workload=Workload("infer", 0, context),
                          runnable=engine_runnable(max_slots, args))
