"""`rsdjax <command>`: one module per command, each exposing `register(subparsers)`.

A command module adds its parser and sets `func(args) -> int`. Errors that are the user's (bad
config, bad checkpoint, bad input) derive from ValueError and are printed as one line, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Command modules, in the order `rsdjax --help` lists them. Add a module here to add a command.
COMMANDS = ("convert", "shard_report", "plan", "tokenizer", "train", "finetune", "lora", "generate", "eval", "serve",
            "route", "warmup")
# Commands that have written everything out when they return (stdout, closed files; nothing in flight).
# Run as the `rsdjax` program they end without the interpreter's teardown: ~0.4 s of freeing the model
# and the XLA client, an eighth of a warm `rsdjax generate`.
ENDS_AT_ONCE = frozenset({"generate", "plan"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsdjax", description="Llama models sharded over device meshes (JAX + Flax NNX)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"rsdjax.cli.{name}").register(sub)
    _add_to_leaves(parser, "--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache ($RSDJAX_CACHE_DIR, else ~/.cache/rsdjax/jax)")
    return parser


def _add_to_leaves(parser: argparse.ArgumentParser, *names, **kw) -> None:
    """Add an option to every (sub)command that runs something, so it can follow the command's own arguments."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.add_argument(*names, **kw)
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            _add_to_leaves(child, *names, **kw)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but trailing `key=value` (or eval's DATA) may also follow options: argparse fills a list
    positional at its first chunk, so in `train CONFIG -o DIR steps=3` it would refuse `steps=3`."""
    args, extra = parser.parse_known_args(argv)
    trailing = next((d for d in ("overrides", "data") if isinstance(getattr(args, d, None), list)), None)
    if extra and (trailing is None or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, trailing).extend(extra)
    return args


def main(argv: list[str] | None = None) -> int:
    return _run(argv)[1]


def entry() -> None:
    """The `rsdjax` program (pyproject's script, `python -m rsdjax`): `main`, then the process ends."""
    command, code = _run(None)
    if command in ENDS_AT_ONCE:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run(argv: list[str] | None) -> tuple[str, int]:
    parser = build_parser()
    args = parse(parser, argv)
    from rsdjax import compile_cache

    if args.no_compile_cache:
        compile_cache.disable()
    else:
        compile_cache.enable()
    try:
        return args.command, int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # our errors (ConfigError, CheckpointError, ShardingError, ...) are ValueErrors with a full message
        print(f"rsdjax {args.command}: error: {e}", file=sys.stderr)
        return args.command, 2
    except KeyboardInterrupt:
        print(f"rsdjax {args.command}: interrupted", file=sys.stderr)
        return args.command, 130


if __name__ == "__main__":
    entry()
