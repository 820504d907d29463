#!/usr/bin/env python
"""Batch generation from Python: the scripted twin of `rsdjax generate`, showing the API it uses.

    python scripts/infer.py --model checkpoints/tiny-hf --prompt "Hello" --prompt "日本の首都は" \
        --max-new-tokens 32 --temperature 0.7 --seed 0 --mesh data=2,tensor=4

Prints one JSON object: every completion's token ids, text (when the model has a tokenizer.json)
and timings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--mesh", default=None, help="e.g. tensor=8 or data=2,tensor=4 (virtual CPU devices on a laptop)")
    ap.add_argument("--max-slots", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=None)
    args = ap.parse_args()

    # the mesh first: on CPU it decides how many virtual devices JAX starts with
    from rsdjax.parallel.mesh import mesh_from_args

    mesh = mesh_from_args(args.mesh) if args.mesh else None

    from rsdjax.infer.engine import load_engine
    from rsdjax.infer.generate import generate
    from rsdjax.infer.interface import SamplingParams

    engine, tokenizer = load_engine(args.model, mesh=mesh, max_slots=args.max_slots, max_context=args.max_context)
    prompts = [[int(t) for t in ids.split(",") if t] for ids in args.prompt_ids]
    if args.prompt and tokenizer is None:
        sys.exit(f"{args.model}: no tokenizer.json; use --prompt-ids")
    prompts += [tokenizer.encode(text, add_bos=True) for text in args.prompt]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    completions = generate(engine, prompts, params, tokenizer=tokenizer)
    print(json.dumps({"completions": [c.to_json() for c in completions]}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
