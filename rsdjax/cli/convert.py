"""`rsdjax convert hf-to-rsdjax|rsdjax-to-hf|gguf-to-rsdjax|gguf-to-hf --model SRC -o DST` (or SRC DST)
[--quantize int8] (*-to-rsdjax: store int8 kernels + scales, rsdjax/infer/quantized.py)."""
from __future__ import annotations

import shutil

from rsdjax.cli.common import add_mesh_args, add_path_arg

DIRECTIONS = ("hf-to-rsdjax", "rsdjax-to-hf", "gguf-to-rsdjax", "gguf-to-hf")


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert between HF Llama directories, GGUF files and rsdjax checkpoints")
    p.add_argument("direction", choices=DIRECTIONS)
    add_path_arg(p, "model", ("--model",),
                 "the model to convert (HF Llama directory, rsdjax checkpoint, or a .gguf file for gguf-to-*)")
    add_path_arg(p, "output", ("-o", "--output"), "the directory to write (must not exist or be empty)")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GB per safetensors file (*-to-hf)")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="*-to-rsdjax: store every projection and the LM head as int8 + scales (MODE: int8); "
                        "generate, serve, warmup and eval then read it as int8 with no flag")
    add_mesh_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rsdjax.checkpoint.hf import save_hf
    from rsdjax.checkpoint.native import quantization_of
    from rsdjax.infer.quantized import save_quantized
    from rsdjax.model.quant import check_mode
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.cli.common import mesh_from_args, path_arg
    from rsdjax.loading import load_model, save_model
    from rsdjax.tokenizer import Tokenizer

    args.src, args.dst = path_arg(args, "model"), path_arg(args, "output")
    if args.dst.exists() and any(args.dst.iterdir()):
        raise ValueError(f"{args.dst}: exists and is not empty; refusing to overwrite")
    if args.direction.startswith("gguf-") != (args.src.suffix.lower() == ".gguf"):
        raise ValueError(f"{args.src}: {args.direction} needs "
                         f"{'a .gguf file' if args.direction.startswith('gguf-') else 'a model directory'}")
    quantize = check_mode(args.quantize)
    if quantize is not None and not args.direction.endswith("-to-rsdjax"):
        raise ValueError(f"--quantize {quantize}: only for *-to-rsdjax (an HF directory holds float weights)")
    stored = quantization_of(args.src) if args.src.is_dir() else None
    if stored is not None:
        raise ValueError(f"{args.src}: already quantized ({stored.get('mode')}); convert the float checkpoint instead")
    mesh = mesh_from_args(args) if (args.mesh or args.hardware) else None
    # keep the source dtype so that a round trip is bit-identical (a GGUF is dequantized to float32)
    model = load_model(args.src, mesh=mesh, param_dtype="keep")
    tokenizer = Tokenizer.for_model(args.src)
    if args.direction.endswith("-to-rsdjax"):
        if quantize is not None:
            save_quantized(model, args.dst, quantize, mesh if mesh is not None else make_mesh({}))
        else:
            save_model(model, args.dst)
        if tokenizer is not None:
            tokenizer.save(args.dst)
    else:
        save_hf(model, args.dst, max_shard_bytes=int(args.max_shard_size * 1e9), tokenizer=tokenizer)
    generation = args.src / "generation_config.json"
    if args.src.is_dir() and generation.exists():
        shutil.copy(generation, args.dst / generation.name)
    print(f"wrote {args.dst}")
    return 0
