"""`rsdjax lora merge --model BASE --lora ADAPTER -o OUT` (or BASE ADAPTER OUT positionally): fold a PEFT
LoRA adapter into its base -> an HF directory."""
from __future__ import annotations

from rsdjax.cli.common import add_mesh_args, add_path_arg


def register(sub) -> None:
    p = sub.add_parser("lora", help="LoRA adapter tools (merge into the base model)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    m = actions.add_parser("merge", help="write BASE + ADAPTER merged as an HF Llama directory")
    add_path_arg(m, "model", ("--model",), "the base: HF Llama directory or rsdjax checkpoint")
    add_path_arg(m, "lora", ("--lora",), "PEFT adapter directory (adapter_config.json + safetensors)")
    add_path_arg(m, "output", ("-o", "--output"), "new HF directory (must not exist or be empty)")
    m.add_argument("--max-shard-size", type=float, default=2.0, help="GB per safetensors file")
    add_mesh_args(m)
    m.set_defaults(func=merge)


def merge(args) -> int:
    from rsdjax.checkpoint.hf import save_hf
    from rsdjax.cli.common import mesh_from_args
    from rsdjax.loading import load_model
    from rsdjax.checkpoint.peft import apply_adapter
    from rsdjax.cli.common import path_arg
    from rsdjax.model.lora import merge_and_unload

    args.base, args.adapter, args.out = path_arg(args, "model"), path_arg(args, "lora"), path_arg(args, "output")
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out}: exists and is not empty; refusing to overwrite")
    mesh = mesh_from_args(args) if (args.mesh or args.hardware) else None
    model = load_model(args.base, mesh=mesh, param_dtype="keep")  # merged weights keep the base's dtype
    merge_and_unload(apply_adapter(model, args.adapter))
    tokenizer_dir = args.base if (args.base / "tokenizer.json").exists() else None
    save_hf(model, args.out, max_shard_bytes=int(args.max_shard_size * 1e9), tokenizer_dir=tokenizer_dir)
    print(f"wrote {args.out}")
    return 0
