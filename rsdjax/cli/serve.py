"""`rsdjax serve --model PATH`: the OpenAI-compatible server (continuous batching over the slot or paged engine)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from rsdjax.cli.common import MODEL, add_engine_args, add_mesh_args, add_overrides


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", type=Path, help="HF Llama directory, GGUF file or rsdjax checkpoint")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.json (default: the model's)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter served as model NAME beside the base (repeatable; a bare DIR is "
                        "named after its folder); requests choose it with \"model\": NAME")
    p.add_argument("--max-loras", type=int, default=0,
                   help="adapter entries on the device (default: as many as --lora gives); more can be loaded "
                        "at run time with POST /v1/load_lora_adapter")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank the pool holds")
    p.add_argument("--served-model-name", action="append", dest="names",
                   help="name(s) clients use in 'model' (default: the model directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("RSDJAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $RSDJAX_API_KEY, else no key)")
    p.add_argument("--max-slots", type=int, default=8,
                   help="requests decoded together at most (vLLM's max_num_seqs; on the paged engine a step costs "
                        "what is running)")
    p.add_argument("--max-context", type=int, help="tokens per request, prompt and output (default: the model's, "
                                                    "at most 4096)")
    p.add_argument("--no-warmup", action="store_true", help="answer /health before every shape is compiled")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429 (>= 1)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival to its last token, then 504 and its slot is "
                        "freed (0 = no limit; default 600)")
    p.add_argument("--max-tokens-default", type=int, default=4096,
                   help="chat requests without max_tokens get the context's remaining room, at most this")
    p.add_argument("--strict-fields", action="store_true",
                   help="refuse unknown request fields with 400 (default: ignore them with a warning, as vLLM)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    fake = p.add_argument_group("testing without a model")
    fake.add_argument("--fake-engine", action="store_true",
                      help="serve the deterministic fake engine (rsdjax.serve.fake_engine) instead of a model")
    fake.add_argument("--fake-step-ms", type=float, default=0.0, help="fake engine: time of one decode step")
    add_engine_args(p.add_argument_group("engine"))
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weights for every projection and the LM head (per-channel scales)")
    add_mesh_args(p)
    add_overrides(p, MODEL)
    p.set_defaults(func=run)


def build_engine(args):
    """(engine, tokenizer, default served name) from the arguments."""
    from rsdjax.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    if args.fake_engine:
        from rsdjax.serve.fake_engine import FakeEngine

        engine = FakeEngine(vocab_size=tokenizer.vocab_size if tokenizer else 512, max_slots=args.max_slots,
                            max_context=args.max_context or 2048,
                            eos_token_ids=tokenizer.eos_ids if tokenizer else None,
                            step_delay=args.fake_step_ms / 1000)
        return engine, tokenizer, "fake"
    if args.model is None:
        raise ValueError("serve: give --model PATH (or --fake-engine)")
    from rsdjax.cli.common import engine_options, serving_mesh, split_overrides
    from rsdjax.infer.engine import load_engine, parse_lora_args

    model_over = split_overrides(args.overrides, "model")
    mesh = serving_mesh(args, args.max_slots, args.max_context, model_over)
    engine, model_tokenizer = load_engine(args.model, mesh=mesh, max_slots=args.max_slots,
                                          max_context=args.max_context, adapters=parse_lora_args(args.lora),
                                          max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                                          overrides=model_over, quantize=args.quantize, **engine_options(args))
    name = args.model.resolve().name
    return engine, tokenizer or model_tokenizer, name[:-5] if name.lower().endswith(".gguf") else name


def run(args) -> int:
    import uvicorn

    from rsdjax.serve.app import create_app

    for flag, value in (("--max-slots", args.max_slots), ("--max-waiting", args.max_waiting),
                        ("--max-body-bytes", args.max_body_bytes), ("--max-tokens-default", args.max_tokens_default)):
        if value < 1:
            raise ValueError(f"serve: {flag} must be >= 1, got {value}")
    if not args.request_timeout >= 0:
        raise ValueError(f"serve: --request-timeout must be >= 0 seconds (0 = no limit), got {args.request_timeout}")
    from rsdjax.cli.common import MODEL, check_overrides

    check_overrides(args.overrides, MODEL)
    from rsdjax.checkpoint.generation_config import sampling_defaults

    engine, tokenizer, default_name = build_engine(args)
    if hasattr(engine, "warmup") and not args.no_warmup:  # compile before /health answers: no slow first requests
        t0 = time.perf_counter()
        shapes = engine.warmup()
        print(f"serve: compiled {shapes} step shapes in {time.perf_counter() - t0:.1f}s", flush=True)
    defaults = sampling_defaults(args.model) if args.model is not None and not args.fake_engine else {}
    app = create_app(engine, tokenizer, args.names or [default_name], api_key=args.api_key,
                     max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                     request_timeout=args.request_timeout or None, max_tokens_default=args.max_tokens_default,
                     strict_fields=args.strict_fields, sampling_defaults=defaults)
    if defaults:
        print(f"serve: sampling defaults from generation_config.json: {defaults}")
    if tokenizer is None:
        print("serve: no tokenizer.json found: only token-id prompts on /v1/completions will work")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
