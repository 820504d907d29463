"""Arguments every command shares: the mesh (or a hardware preset) and `key=value` overrides."""
from __future__ import annotations

import argparse


def add_mesh_args(parser: argparse.ArgumentParser, default_hardware: str | None = None) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--mesh", help="mesh axis sizes, e.g. data=2,tensor=4 (one axis may be -1 = the rest)")
    g.add_argument("--hardware", default=default_hardware,
                   help="hardware preset (configs/hardware/*.yaml) whose default mesh to use, e.g. atom-server")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.num_layers=4")


def split_overrides(overrides: list[str], prefix: str) -> list[str]:
    """The overrides under `prefix.` with the prefix removed (model.x=1 -> x=1)."""
    return [o[len(prefix) + 1:] for o in overrides if o.startswith(prefix + ".")]


def mesh_from_args(args, hardware_overrides: list[str] = ()):
    """Make the mesh the arguments ask for, setting up virtual CPU devices first when needed."""
    from rsdjax.parallel.mesh import mesh_from_args as build

    hardware = args.hardware if args.mesh is None else None
    return build(args.mesh, hardware or ("cpu" if args.mesh is None else None), overrides=hardware_overrides)


def add_engine_args(group) -> None:
    """The paged engine's options (`rsdjax serve` and `rsdjax generate`), named as vLLM names them."""
    group.add_argument("--engine", choices=["paged", "slots"], default="paged",
                       help="paged: paged KV cache with prefix caching and chunked prefill (default); "
                            "slots: one contiguous cache per slot")
    group.add_argument("--page-size", type=int, default=16, help="tokens per KV page (vLLM's block size; 16-128)")
    group.add_argument("--kv-cache-gb", type=float, default=None,
                       help="KV page pool per device in GiB (default: --kv-memory-fraction of the free device "
                            "memory; 1 GiB where the backend reports none, as XLA:CPU)")
    group.add_argument("--kv-memory-fraction", type=float, default=0.9,
                       help="share of the free device memory the page pool takes when --kv-cache-gb is not given")
    group.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the pages of cached prefixes")
    group.add_argument("--max-step-tokens", type=int, default=256,
                       help="tokens per engine step, decode and prompt chunks together (vLLM's max_num_batched_tokens)")


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
