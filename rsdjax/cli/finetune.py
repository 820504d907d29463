"""`rsdjax finetune CONFIG [-o ADAPTER_DIR] [key=value ...]`: LoRA fine-tuning on Q&A data -> a PEFT adapter."""
from __future__ import annotations

from rsdjax.cli.common import add_mesh_args, add_output_override, add_overrides
from rsdjax.distributed import add_distributed_args


def register(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA fine-tuning on Q&A / chat jsonl; writes a PEFT adapter")
    p.add_argument("config", help="config preset (configs/train, e.g. lora-qa-demo) or YAML file")
    add_output_override(p, "output", "the PEFT adapter directory (its checkpoints/ resume the run)")
    add_mesh_args(p)
    add_distributed_args(p)
    add_overrides(p, ("", "rsdjax.sft.config:FinetuneConfig"))
    p.set_defaults(func=run)


def run(args) -> int:
    from rsdjax.cli.common import distributed_mesh, output_override
    from rsdjax.parallel.mesh import resolve_mesh_shape
    from rsdjax.sft import finetune, load_finetune_config, show_answers

    cfg = load_finetune_config(args.config, output_override(args))
    mesh = distributed_mesh(args, resolve_mesh_shape(args.mesh, None if args.mesh else args.hardware or "cpu"))
    result = finetune(cfg, mesh=mesh)
    if result.already_complete:
        return 0
    show_answers(cfg.demo_questions, result.answers_before, result.answers_after)
    print(f"\nwrote adapter {result.adapter_dir} in {result.seconds:.1f} s")
    return 0
