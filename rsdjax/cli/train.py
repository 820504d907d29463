"""`rsdjax train CONFIG [-o RUN_DIR] [key=value ...]`: continual pre-training; the same command resumes.

`--dry-run` checks a full-size config without data or memory: it resolves the config, shards the
abstract parameters and optimizer state with the training rules, prints the bytes per device and
lowers the jitted train step (AOT) for the configured batch.
"""
from __future__ import annotations

import sys

from rsdjax.cli.common import add_mesh_args, add_output_override, add_overrides


def register(sub) -> None:
    p = sub.add_parser("train", help="continual pre-training (tokenizer extension, sharded, resumable)")
    p.add_argument("config", help="train config: a YAML file or a name under configs/train (e.g. cpt-demo)")
    add_output_override(p, "run_dir", "run directory: checkpoints, logs, loss curve, final model")
    p.add_argument("--dry-run", action="store_true", help="check shardings and memory, lower the step; no training")
    add_mesh_args(p)
    from rsdjax.distributed import add_distributed_args

    add_distributed_args(p)
    add_overrides(p, ("", "rsdjax.train.config:TrainConfig"))
    p.set_defaults(func=run)


def mesh_args(args, cfg) -> tuple[str | None, str | None]:
    """(mesh, hardware): the command line wins over the config; a mesh wins over a hardware preset."""
    mesh = args.mesh or (None if args.hardware else cfg.mesh)
    return mesh, None if mesh else (args.hardware or cfg.hardware)


def train_workload(cfg):
    """The planner's view of a training config: global batch x sequence length in grad_accum micro-batches."""
    from rsdjax.plan.cost_model import Workload

    return Workload("train", cfg.batch_size, cfg.data.seq_len, grad_accum=cfg.grad_accum)


def run(args) -> int:
    from rsdjax.cli.common import distributed_mesh, output_override, planned_mesh_shape
    from rsdjax.parallel.mesh import resolve_mesh_shape
    from rsdjax.train.config import load_train_config

    cfg = load_train_config(args.config, output_override(args))
    mesh_text, hardware = mesh_args(args, cfg)
    if args.hardware and not args.mesh:  # --hardware on the command line: the planner's best training split
        shape = planned_mesh_shape(args, cfg.model, train_workload(cfg))
    else:
        shape = resolve_mesh_shape(mesh_text, hardware)
    mesh = distributed_mesh(args, shape)
    if args.dry_run:
        from rsdjax.train.dry_run import dry_run

        dry_run(cfg, mesh)
        return 0
    from rsdjax.train.loop import train

    result = train(cfg, mesh)
    if result.stopped_by:
        return 128 + {"SIGINT": 2, "SIGTERM": 15}.get(result.stopped_by, 0)
    if result.finished and result.first_loss is not None:
        print(f"{cfg.name}: {result.step} steps, loss {result.first_loss:.3f} -> {result.last_loss:.3f}; "
              f"run directory {result.run_dir}", file=sys.stderr)
    elif result.finished:
        print(f"{cfg.name}: already complete at step {result.step}; run directory {result.run_dir} "
              "(change run_dir to train again)", file=sys.stderr)
    return 0
