"""`rsdjax eval --model PATH [--lora DIR] [--quantize int8] DATA... [model.KEY=VALUE ...] [--json]`: perplexity, bits per byte,
Q&A accuracy.

DATA and overrides share the positional arguments: an argument `model.KEY=VALUE` is a model config override
(generate's and serve's spelling), any other is a source (`PATH` or `NAME=PATH[,PATH...]`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rsdjax.chat import TEMPLATES
from rsdjax.cli.common import MODEL, add_mesh_args, list_keys_in_help


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / bits per byte of text, accuracy of greedy Q&A answers")
    p.add_argument("--model", type=Path, required=True, help="HF Llama directory or rsdjax checkpoint")
    p.add_argument("--lora", type=Path, default=None, help="PEFT LoRA adapter directory to apply to the model")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="a source: file, directory or glob (.txt, .jsonl text or Q&A), or NAME=PATH[,PATH...]; "
                        "model.KEY=VALUE is a model config override, e.g. model.dtype=bfloat16")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: min(1024, the model's context))")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (rounded up to the mesh's batch shards)")
    p.add_argument("--template", default="chat", choices=TEMPLATES,
                   help="Q&A files: chat (the tokenizer's own template, as fine-tuning uses by default) | llama3 | plain")
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=64,
                   help="greedy answer length for Q&A files")
    p.add_argument("--no-generate", action="store_true", help="Q&A files: answer loss only, no greedy answers")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quantize", default=None, metavar="MODE",
                   help="evaluate with every projection and the LM head int8 (MODE: int8), as generate/serve run it; "
                        "an int8 checkpoint (convert --quantize int8) is read as int8 without it")
    add_mesh_args(p)
    list_keys_in_help(p, MODEL)
    p.set_defaults(func=run)


def split_data(items: list[str]) -> tuple[list[str], list[str]]:
    """(the `model.KEY=VALUE` overrides, the sources) of eval's positional arguments."""
    prefix = MODEL[0] + "."
    overrides = [i for i in items if "=" in i and i.startswith(prefix)]
    return overrides, [i for i in items if i not in overrides]


def parse_sources(items: list[str]):
    from rsdjax.eval.run import Source

    sources = []
    for item in items:
        name, sep, paths = item.partition("=")
        if not sep:
            name, paths = item, item
        if not name or not paths:
            raise ValueError(f"eval: data '{item}' is not PATH or NAME=PATH[,PATH...]")
        if name in {s.name for s in sources}:
            raise ValueError(f"eval: source name '{name}' given twice")
        sources.append(Source(name, paths.split(",")))
    return sources


def run(args) -> int:
    from rsdjax.cli.common import check_overrides, mesh_from_args, split_overrides
    from rsdjax.eval.run import evaluate_model
    from rsdjax.infer.engine import stored_quantization
    from rsdjax.infer.forward import serving_weights
    from rsdjax.infer.quantized import load_quantized
    from rsdjax.model.quant import check_mode, quantize_serving
    from rsdjax.loading import load_model
    from rsdjax.train.step import check_batch
    from rsdjax.tokenizer import Tokenizer

    overrides, data = split_data(args.data)
    check_overrides(overrides, MODEL)
    args.model_overrides = split_overrides(overrides, MODEL[0])
    if not data:
        raise ValueError("eval: give at least one DATA source (model.KEY=VALUE arguments are overrides)")
    sources = parse_sources(data)
    tokenizer = Tokenizer.load(args.tokenizer or args.model)
    mesh = mesh_from_args(args, **_planner_inputs(args))
    shards = _batch_shards(mesh)
    batch_size = -(-max(args.batch_size, 1) // shards) * shards
    check_batch(batch_size, 1, mesh)
    quantize = check_mode(args.quantize)
    weights = None  # int8 serving weights, when evaluating int8
    stored = stored_quantization(args.model, quantize, args.lora, args.model_overrides)  # an int8 checkpoint
    if stored is not None:
        model, weights = load_quantized(args.model, mesh)
    else:
        model = load_model(args.model, mesh=mesh, rules="train", overrides=args.model_overrides)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={model.cfg.vocab_size}")
    seq_len = args.seq_len or min(1024, model.cfg.max_position_embeddings)
    if not 1 <= seq_len <= model.cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} must be in [1, {model.cfg.max_position_embeddings}] (the model's context)")
    if args.lora is not None:
        from rsdjax.checkpoint.peft import apply_adapter

        model = apply_adapter(model, args.lora)
    if quantize is not None:  # LoRA, if any, stays float on top
        weights = quantize_serving(serving_weights(model, mesh), quantize)
    engine = None
    if not args.no_generate and _has_qa(sources):
        from rsdjax.infer.engine import SlotEngine, eos_ids_for

        context = min(model.cfg.max_position_embeddings, seq_len + args.max_new_tokens)
        engine = SlotEngine(model, max_slots=batch_size, max_context=context, mesh=mesh,
                            eos_token_ids=eos_ids_for(args.model, model.cfg, tokenizer))
        if weights is not None:
            engine.weights = weights
    results = evaluate_model(model, tokenizer, sources, mesh, seq_len=seq_len, batch_size=batch_size, engine=engine,
                             template=args.template, max_new_tokens=args.max_new_tokens, weights=weights)
    if args.json:
        print(json.dumps({"model": str(args.model), "lora": str(args.lora) if args.lora else None, "seq_len": seq_len,
                          "quantize": quantize or stored,
                          "sources": {k: v.to_json() for k, v in results.items()}}, ensure_ascii=False))
        return 0
    print(f"{'source':<24}{'tokens':>10}{'loss':>9}{'ppl':>10}{'bits/byte':>11}{'chars/tok':>11}{'EM':>7}{'contains':>10}")
    for name, r in results.items():
        m = r.metrics
        qa = f"{r.qa.exact_match:>7.1%}{r.qa.contains_answer:>10.1%}" if r.qa else ""
        print(f"{name:<24}{m.predicted:>10,}{m.loss:>9.4f}{m.perplexity:>10.3f}{m.bits_per_byte:>11.4f}"
              f"{m.chars_per_token:>11.3f}{qa}")
    for name, r in results.items():
        for item in (r.qa.to_json()["items"] if r.qa else []):
            print(f"[{name}] Q: {item['question']}\n    A: {item['answer']}\n    reference: {item['reference']}",
                  file=sys.stderr)
    return 0


def _has_qa(sources) -> bool:
    from rsdjax.data.sources import expand_paths
    from rsdjax.eval.qa import is_qa_file

    return any(is_qa_file(f) for s in sources for f in expand_paths(s.paths))


def _planner_inputs(args) -> dict:
    """For `--hardware` without `--mesh`: the model and a forward-only workload (batch x window) to plan for."""
    if args.mesh is not None or not args.hardware:
        return {}
    from rsdjax.cli.common import engine_runnable
    from rsdjax.config import apply_overrides
    from rsdjax.loading import read_model_config
    from rsdjax.plan.cost_model import Workload

    cfg = apply_overrides(read_model_config(args.model), args.model_overrides)
    seq = args.seq_len or min(1024, cfg.max_position_embeddings)
    return {"cfg": cfg, "workload": Workload("infer", max(args.batch_size, 1), seq, prompt=seq),
            "runnable": engine_runnable(None)}


def _batch_shards(mesh) -> int:
    from rsdjax.train.step import batch_sharding

    n = 1
    for entry in batch_sharding(mesh).spec[:1]:  # an empty spec: the batch is not sharded
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= int(mesh.shape[axis])
    return n
