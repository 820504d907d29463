"""Serving benchmark, like `vllm bench serve`: load on one server, and on a router in front of two.

    python scripts/bench_serve.py                          # a random small HF Llama made on the fly
    python scripts/bench_serve.py --model PATH --input-len 512 --output-len 256 --concurrency 16
    python scripts/bench_serve.py --request-rate 4         # Poisson arrivals instead of a fixed concurrency
    python scripts/bench_serve.py --fake-engine            # smoke test of the serving stack, no model
    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --model-name NAME   # an existing server

Every server and the router run as child processes on 127.0.0.1 and are stopped at the end.
Alongside the load runs, in the same run: the engine's own decode throughput with every slot busy,
measured in-process without HTTP (the limit a server on this machine can reach), and the peer, HF
transformers `generate` serving the same requests one at a time (what serving without batching
gives). JSON goes to bench_results/serve.json. On a shared 2-core machine the numbers are noisy.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rsdjax.serve import loadgen  # noqa: E402
from rsdjax.serve.launch import spawn, stop_process  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="HF Llama directory or rsdjax checkpoint (default: make a small one)")
    src.add_argument("--fake-engine", action="store_true", help="serve the fake engine (no model): a smoke test")
    src.add_argument("--base-url", help="benchmark this running server instead of starting any")
    p.add_argument("--model-name", help="'model' field to send (default: what the server lists first)")
    p.add_argument("--scenarios", default="server,router", help="comma list of: server, router (2 servers)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16, help="maximum requests in flight (0 = no cap)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrival rate, req/s (inf = all at once)")
    p.add_argument("--max-slots", type=int, default=8, help="per server")
    p.add_argument("--fake-step-ms", type=float, default=10.0, help="fake engine: one decode step")
    p.add_argument("--peer-requests", type=int, default=4, help="requests the HF peer serves (0 = skip the peer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "serve.json")
    args = p.parse_args(argv)
    if min(args.num_prompts, args.input_len, args.output_len, args.max_slots) < 1 or args.concurrency < 0:
        p.error("--num-prompts, --input-len, --output-len, --max-slots must be >= 1, --concurrency >= 0")
    return args


def make_small_model(path: Path) -> Path:
    """A random HF Llama, small enough for a CPU yet with real matmuls (~15M parameters, float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def vocab_size(args) -> int:
    if args.model is None:
        return 512
    config = args.model / "config.json"
    if config.exists():
        return int(json.loads(config.read_text())["vocab_size"])
    from rsdjax.loading import read_model_config

    return read_model_config(args.model).vocab_size


def server_args(args, context: int) -> list[str]:
    common = ["--max-slots", str(args.max_slots), "--max-context", str(context), "--log-level", "warning"]
    if args.fake_engine:
        return ["--fake-engine", "--fake-step-ms", str(args.fake_step_ms), *common]
    return ["--model", str(args.model), "--served-model-name", "bench", *common]


@contextlib.contextmanager
def launched(scenario: str, args, context: int, logs: Path):
    """Start the servers (and router) of a scenario; yield the URL to load."""
    procs = []
    try:
        n = 1 if scenario == "server" else 2
        urls = []
        for i in range(n):
            proc, url = spawn("serve", server_args(args, context), log_file=logs / f"{scenario}_server{i}.log",
                              timeout=900)
            procs.append(proc)
            urls.append(url)
        if scenario == "router":
            backends = [a for u in urls for a in ("--backend", u)]
            proc, url = spawn("route", [*backends, "--policy", "least-loaded", "--log-level", "warning"],
                              log_file=logs / "router.log", timeout=60)
            procs.append(proc)
            urls = [url]
        yield urls[0]
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def warm_up(url: str, model: str, args, vocab: int) -> None:
    """One request per slot of every server, so compilation is not in the measurement."""
    prompts = loadgen.random_prompts(args.max_slots * 2, args.input_len, vocab, seed=args.seed + 1)
    asyncio.run(loadgen.run_load(url, model, prompts, min(args.output_len, 8), concurrency=len(prompts)))


def engine_limit(args, context: int, vocab: int) -> dict:
    """Decode tokens/s of the engine itself, every slot busy, no HTTP: the ceiling for one server."""
    from rsdjax.infer.interface import Request, SamplingParams

    if args.fake_engine:
        from rsdjax.serve.fake_engine import FakeEngine

        engine = FakeEngine(vocab_size=vocab, max_slots=args.max_slots, max_context=context,
                            step_delay=args.fake_step_ms / 1000)
    else:
        from rsdjax.infer.engine import load_engine

        engine, _ = load_engine(args.model, max_slots=args.max_slots, max_context=context)
    prompts = loadgen.random_prompts(args.max_slots, args.input_len, vocab, seed=args.seed + 2)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for slot, prompt in enumerate(prompts):
        engine.insert(engine.prefill(Request(f"limit{slot}", prompt, params)), slot)
    warm = min(3, args.output_len // 4)
    for _ in range(warm):  # compile
        engine.generate()
    steps, tokens, start = 0, 0, time.perf_counter()
    while steps < args.output_len - warm - 2:
        tokens += len(engine.generate())
        steps += 1
    seconds = time.perf_counter() - start
    return {"decode_tokens_per_s": tokens / seconds, "steps": steps, "slots": args.max_slots}


def hf_peer(args, n: int, vocab: int) -> dict | None:
    """HF transformers generate, one request at a time (serving without batching)."""
    if n == 0 or args.fake_engine or not (args.model / "config.json").exists():
        return None
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = loadgen.random_prompts(n + 1, args.input_len, vocab, seed=args.seed + 3)
    kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len, pad_token_id=0)
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        start = time.perf_counter()
        for prompt in prompts[1:]:
            model.generate(torch.tensor([prompt]), **kw)
        seconds = time.perf_counter() - start
    return {"requests": n, "output_tokens_per_s": n * args.output_len / seconds,
            "total_tokens_per_s": n * (args.input_len + args.output_len) / seconds, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / "serve_logs"
    logs.mkdir(exist_ok=True)
    context = args.input_len + args.output_len
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := set(scenarios) - {"server", "router"}:
        raise SystemExit(f"bench_serve: unknown scenario(s) {sorted(unknown)}; use server, router")
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None and not args.fake_engine and not args.base_url:
            args.model = make_small_model(Path(tmp) / "small_llama")
            result["config"]["model"] = "random small Llama (vocab 4096, hidden 384, 4 layers), made for this run"
        vocab = vocab_size(args)
        prompts = loadgen.random_prompts(args.num_prompts, args.input_len, vocab, seed=args.seed)
        targets = [("given server", None)] if args.base_url else [(s, s) for s in scenarios]
        for name, scenario in targets:
            with (launched(scenario, args, context, logs) if scenario else contextlib.nullcontext(args.base_url)) as url:
                import httpx

                model = args.model_name or httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
                warm_up(url, model, args, vocab)
                results, duration = asyncio.run(loadgen.run_load(
                    url, model, prompts, args.output_len, concurrency=args.concurrency or None,
                    request_rate=args.request_rate, seed=args.seed))
                summary = loadgen.summarize(results, duration)
                result["scenarios"][name] = summary
                print(loadgen.format_summary(name, summary), flush=True)
        if not args.base_url:
            result["engine_limit"] = limit = engine_limit(args, context, vocab)
            print(f"== engine alone, {args.max_slots} slots busy: {limit['decode_tokens_per_s']:.1f} tok/s (the limit)")
            result["peer_hf_sequential"] = peer = hf_peer(args, args.peer_requests, vocab)
            for name, s in result["scenarios"].items():
                s["fraction_of_one_engine_limit"] = s["output_throughput"] / limit["decode_tokens_per_s"]
                line = f"== {name}: {s['fraction_of_one_engine_limit']:.2f} of one engine's limit"
                if peer:
                    s["ratio_vs_hf_sequential"] = s["output_throughput"] / peer["output_tokens_per_s"]
                    line += f", {s['ratio_vs_hf_sequential']:.2f}x HF generate one request at a time " \
                            f"({peer['output_tokens_per_s']:.1f} tok/s)"
                print(line)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(s["failed"] == 0 for s in result["scenarios"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
