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
