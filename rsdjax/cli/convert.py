"""`rsdjax convert hf-to-rsdjax|rsdjax-to-hf --model SRC -o DST` (or SRC DST positionally)."""
from __future__ import annotations

from rsdjax.cli.common import add_mesh_args, add_path_arg


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert between HF Llama directories and rsdjax checkpoints")
    p.add_argument("direction", choices=["hf-to-rsdjax", "rsdjax-to-hf"])
    add_path_arg(p, "model", ("--model",), "the model to convert (HF Llama directory or rsdjax checkpoint)")
    add_path_arg(p, "output", ("-o", "--output"), "the directory to write (must not exist or be empty)")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GB per safetensors file (rsdjax-to-hf)")
    add_mesh_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rsdjax.checkpoint.hf import save_hf
    from rsdjax.cli.common import mesh_from_args
    from rsdjax.cli.common import path_arg
    from rsdjax.loading import load_model, save_model

    args.src, args.dst = path_arg(args, "model"), path_arg(args, "output")
    if args.dst.exists() and any(args.dst.iterdir()):
        raise ValueError(f"{args.dst}: exists and is not empty; refusing to overwrite")
    mesh = mesh_from_args(args) if (args.mesh or args.hardware) else None
    # keep the source dtype so that a round trip is bit-identical
    model = load_model(args.src, mesh=mesh, param_dtype="keep")
    if args.direction == "hf-to-rsdjax":
        save_model(model, args.dst)
    else:
        tokenizer_dir = args.src if (args.src / "tokenizer.json").exists() else None
        save_hf(model, args.dst, max_shard_bytes=int(args.max_shard_size * 1e9), tokenizer_dir=tokenizer_dir)
    print(f"wrote {args.dst}")
    return 0
