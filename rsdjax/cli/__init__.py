"""`rsdjax <command>`: one module per command, each exposing `register(subparsers)`.

A command module adds its parser and sets `func(args) -> int`. Errors that are the user's (bad
config, bad checkpoint, bad input) derive from ValueError and are printed as one line, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Command modules, in the order `rsdjax --help` lists them. Add a module here to add a command.
COMMANDS = ("convert", "shard_report", "plan", "tokenizer", "train", "finetune", "lora", "generate", "eval", "serve", "route")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsdjax", description="Llama models sharded over device meshes (JAX + Flax NNX)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"rsdjax.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # our errors (ConfigError, CheckpointError, ShardingError, ...) are ValueErrors with a full message
        print(f"rsdjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rsdjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
