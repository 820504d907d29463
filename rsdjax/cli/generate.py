"""`rsdjax generate --model PATH --prompt "..." [--prompt-ids 1,2,3] ... [--json]`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rsdjax.cli.common import MODEL, add_engine_args, add_mesh_args, add_overrides, split_overrides

DEFAULT_SLOTS = 8
# Prompts this short (all together) are prefilled one token a step through the decode program (the
# paged engine's max_chunk=1): on a warm CPU start, loading a prompt-chunk program and running it the
# first time cost ~0.65 s (deserializing it, and XLA:CPU setting up its ~400 YNNPACK fusions), ~35
# decode steps of SmolLM2-135M; a cold start also compiles one program fewer.
SHORT_PROMPT = 24


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate from a model (HF dir or rsdjax checkpoint) sharded over a mesh")
    p.add_argument("--model", type=Path, required=True, help="HF Llama directory, GGUF file or rsdjax checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (needs tokenizer.json); repeat for a batch")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="comma-separated token ids, e.g. 1,2,3; repeat for a batch")
    p.add_argument("--lora", action="append", default=[], metavar="[NAME=]DIR",
                   help="PEFT LoRA adapter directory to apply to the model (serve's syntax; one adapter)")
    p.add_argument("--chat", action="store_true",
                   help="send each --prompt as a user message through the model's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    p.add_argument("--no-bos", action="store_true",
                   help="do not prepend BOS to text prompts (by default: when the tokenizer adds one)")
    s = p.add_argument_group("sampling")
    # named like the API fields (max_tokens, stop_token_ids); the first spellings still work
    s.add_argument("--max-tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 = off")
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--stop-token-ids", "--stop-ids", dest="stop_ids", default="", help="comma-separated stop token ids")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--logprobs", type=int, default=None, help="return the top-N logprobs of each token (--json)")
    e = p.add_argument_group("engine")
    e.add_argument("--max-slots", type=int, default=None, help=f"decode slots (default: prompts, at most {DEFAULT_SLOTS})")
    e.add_argument("--max-context", type=int, default=None,
                   help="tokens per request (default: the longest prompt + max-new-tokens, rounded up)")
    add_engine_args(e)
    p.add_argument("--json", action="store_true", help="print one JSON object (ids, text, timings) instead of streaming")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights for every projection and the LM head (per-channel scales)")
    add_mesh_args(p)
    add_overrides(p, MODEL)
    p.set_defaults(func=run)


def parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"{what}: '{text}' is not a comma-separated list of token ids") from None


def default_context(longest: int, new_tokens: int, model_max: int) -> int:
    """A cache just long enough: the next power of two >= prompt + new tokens (>= 64), capped at the model's."""
    need = longest + new_tokens
    size = 64
    while size < need:
        size *= 2
    return min(size, model_max)


def run(args) -> int:
    from rsdjax import compile_cache
    from rsdjax.cli.common import engine_options, engine_runnable, mesh_from_args
    from rsdjax.plan.cost_model import Workload
    from rsdjax.infer.engine import load_engine, parse_lora_args
    from rsdjax.infer.generate import checked_requests, generate
    from rsdjax.infer.interface import SamplingParams
    from rsdjax.infer.warmup import compile_for_prompts
    from rsdjax.config import apply_overrides
    from rsdjax.loading import read_model_config
    from rsdjax.tokenizer import Tokenizer

    from rsdjax.cli.common import MODEL, check_overrides

    check_overrides(args.overrides, MODEL)
    if not args.prompt and not args.prompt_ids:
        raise ValueError("generate: give at least one --prompt or --prompt-ids")
    if args.chat and not args.prompt:
        raise ValueError("generate: --chat formats --prompt text as a user message; --prompt-ids are sent as they are")
    for flag, value in (("--max-slots", args.max_slots), ("--max-context", args.max_context)):
        if value is not None and value < 1:
            raise ValueError(f"generate: {flag} must be >= 1, got {value}")
    tokenizer = Tokenizer.for_model(args.model)
    if args.prompt and tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer.json, so --prompt cannot be used; give --prompt-ids")
    prompts = [parse_ids(t, "--prompt-ids") for t in args.prompt_ids]
    system = [{"role": "system", "content": args.system}] if args.system else []
    for text in args.prompt:
        if args.chat:
            prompts.append(tokenizer.apply_chat_template(system + [{"role": "user", "content": text}]))
        else:
            prompts.append(tokenizer.encode(text, add_bos=tokenizer.add_bos and not args.no_bos))
    params = SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop_token_ids=parse_ids(args.stop_ids, "--stop-ids"),
        stop=list(args.stop), ignore_eos=args.ignore_eos, logprobs=args.logprobs)

    cfg = apply_overrides(read_model_config(args.model), split_overrides(args.overrides, "model"))
    max_context = args.max_context or default_context(max(map(len, prompts)), args.max_new_tokens,
                                                      cfg.max_position_embeddings)
    slots = args.max_slots or min(len(prompts), DEFAULT_SLOTS)
    workload = Workload("infer", 0, max_context, prompt=min(max_context, max(map(len, prompts))))
    mesh = mesh_from_args(args, cfg=cfg, workload=workload, runnable=engine_runnable(args.max_slots, args)) \
        if (args.mesh or args.hardware) else None
    if mesh is not None:  # slots shard over `data`: round up so they divide it
        data = int(mesh.shape["data"])
        slots = -(-slots // data) * data
    adapters = list(parse_lora_args(args.lora).values())
    if len(adapters) > 1:
        raise ValueError("generate: give one --lora (serve one adapter per request with rsdjax serve)")
    options = engine_options(args)
    if options["kind"] == "paged" and sum(map(len, prompts)) <= SHORT_PROMPT:  # one token a step in all
        options["max_chunk"] = 1
    t0 = time.perf_counter()
    engine, _ = load_engine(args.model, mesh=mesh, max_slots=slots, max_context=max_context,
                            overrides=split_overrides(args.overrides, "model"), lora=adapters[0] if adapters else None,
                            quantize=args.quantize, tokenizer=tokenizer, **options)
    checked_requests(engine, prompts, params, tokenizer)  # a bad request fails before minutes of compiling
    # every shape the generation can reach, before the first token: nothing compiles mid-stream
    if hasattr(engine, "warmup"):  # the paged engine: the shapes these prompts reach
        engine.warmup(engine.shapes_for(map(len, prompts), args.max_new_tokens))
    else:
        compile_for_prompts(engine, prompts, args.max_new_tokens, logprobs=args.logprobs is not None)
    load_s = time.perf_counter() - t0

    stream = not args.json and len(prompts) == 1
    if stream:
        on_text = (lambda i, piece: print(piece, end="", flush=True)) if tokenizer else None
        on_token = None if tokenizer else (lambda i, ev: print(ev.token_id, end=" ", flush=True))
    else:
        on_text = on_token = None
    marks: dict[str, dict] = {}  # the compile counts at the first and at the latest token

    def on_token_counting(i, event):
        marks.setdefault("first", compile_cache.stats())
        marks["last"] = compile_cache.stats()
        if on_token is not None:
            on_token(i, event)

    start = time.perf_counter()
    completions = generate(engine, prompts, params, tokenizer=tokenizer, on_text=on_text, on_token=on_token_counting)
    total_s = time.perf_counter() - start
    compiles = {**compile_cache.stats(), "at_first_token": marks["first"],
                "mid_stream": marks["last"]["executables"] - marks["first"]["executables"]}
    generated = sum(len(c.token_ids) for c in completions)
    summary = {"load_s": load_s, "total_s": total_s, "ttft_s": min(c.ttft_s for c in completions),
               "generated_tokens": generated, "tokens_per_s": generated / total_s if total_s > 0 else None}
    if args.json:
        out = {"model": str(args.model), "mesh": {k: int(v) for k, v in engine.mesh.shape.items()},
               "max_slots": engine.max_slots, "max_context": engine.max_context, **summary,
               "compile": {**compiles, "cache_dir": str(compile_cache.active_dir() or "") or None},
               "completions": [c.to_json() for c in completions]}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if stream:
        print()
    else:
        for c in completions:
            shown = c.text if c.text is not None else " ".join(map(str, c.token_ids))
            print(f"[{c.index}] {shown}")
    c = completions[0]
    rate = c.decode_tokens_per_s
    print(f"generate: {generated} tokens in {total_s:.2f}s ({summary['tokens_per_s']:.1f} tokens/s), "
          f"first token after {summary['ttft_s']:.3f}s" + (f", decode {rate:.1f} tokens/s per prompt" if rate else "")
          + f", finish: {', '.join(sorted({str(c.finish_reason) for c in completions}))}", file=sys.stderr)
    return 0
