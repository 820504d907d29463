#!/usr/bin/env python
"""Multi-LoRA decode benchmark: 4 adapters in one batch vs the base model alone, same run, same weights.

    python scripts/bench_lora.py            # ~125M Llama, f32, batch 8, 4 rank-16 all-linear adapters
    python scripts/bench_lora.py --quick    # a tiny model: a smoke run

Three engines over one random-weight Llama (bench_infer's 125M config): the base engine without an
adapter pool (the peer: what a server without multi-LoRA runs), and the engine with a pool of 4
PEFT adapters (made with `peft`, rank 16, every linear layer), once with the batch spread over the
4 adapters (2 rows each) and once with every row on the base (which should cost nothing: such a batch
runs the step compiled without LoRA). Each figure
is decode tokens/s over --steps steps with all rows busy, best of --repeats runs, the sides
alternating. Reported: the ratio multi-LoRA / base (goal >= 0.8) and each side's fraction of this
machine's decode limit (every weight read once per step: weight bytes / measured bandwidth).
JSON goes to bench_results/lora.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))

from bench_infer import MODEL_125M, MODEL_QUICK, decode_weight_bytes, make_model, measure_bandwidth  # noqa: E402

GOAL = 0.8
ADAPTERS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 48, quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="default 3, quick 1")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "lora.json")
    args = p.parse_args(argv)
    args.steps = args.steps or (8 if args.quick else 48)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def make_adapters(base: Path, root: Path, rank: int) -> dict[str, str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    out = {}
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(root / f"a{i}")
        out[f"a{i}"] = str(root / f"a{i}")
    return out


def decode_runner(engine, adapters: list[int], steps: int, prompt_len: int = 32):
    """A function that fills every slot (row i on pool entry adapters[i]) and times `steps` decode steps."""
    import numpy as np

    from rsdjax.infer.interface import Request, SamplingParams

    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)

    def once() -> float:
        requests = [Request(f"r{i}", rng.integers(3, engine.cfg.vocab_size, prompt_len).tolist(), params, a)
                    for i, a in enumerate(adapters)]
        for slot, prefix in enumerate(engine.prefill_many(requests)):
            engine.insert(prefix, slot)
        engine.generate()  # the first step may meet a new attention bucket: not timed
        t = time.perf_counter()
        for _ in range(steps):
            events = engine.generate()
        elapsed = time.perf_counter() - t
        assert len(events) == len(adapters)
        for slot in range(engine.max_slots):
            engine.free(slot)
        return len(adapters) * steps / elapsed

    once()  # compile
    return once


def main(argv=None) -> int:
    args = parse_args(argv)
    from rsdjax.infer.engine import load_engine

    config = MODEL_QUICK if args.quick else MODEL_125M
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        make_model(base, config)
        adapters = make_adapters(base, Path(tmp), args.rank)
        context = 64 + args.steps + 8
        # the slot engine: decode_runner prefills its batch in one pass (prefill_many)
        plain, _ = load_engine(base, max_slots=args.batch, max_context=context, kind="slots")
        pooled, _ = load_engine(base, max_slots=args.batch, max_context=context, adapters=adapters,
                                max_lora_rank=args.rank, kind="slots")
        spread = [1 + i % ADAPTERS for i in range(args.batch)]  # 2 rows per adapter at batch 8
        runs = {"base": decode_runner(plain, [0] * args.batch, args.steps),
                "multi_lora": decode_runner(pooled, spread, args.steps),
                "pool_all_base": decode_runner(pooled, [0] * args.batch, args.steps)}
        best = {k: 0.0 for k in runs}
        for _ in range(args.repeats):  # alternate, so every side sees the same load
            for name, run in runs.items():
                best[name] = max(best[name], run())
        weight_bytes = decode_weight_bytes(config)
        bandwidth = measure_bandwidth(1 << (24 if args.quick else 30))
    limit = args.batch * bandwidth["bytes_per_s"] / weight_bytes  # tokens/s if a step only read the weights
    ratio = best["multi_lora"] / best["base"]
    result = {
        "model": config, "batch": args.batch, "adapters": ADAPTERS, "rank": args.rank, "steps": args.steps,
        "repeats": args.repeats, "tokens_per_s": best, "multi_lora_over_base": ratio,
        "pool_all_base_over_base": best["pool_all_base"] / best["base"], "goal_ratio": GOAL,
        "meets_goal": ratio >= GOAL, "decode_limit_tokens_per_s": limit,
        "fraction_of_decode_limit": {k: v / limit for k, v in best.items()},
        "adapter_bytes_each": pooled.adapters.bytes_per_adapter(), "bandwidth": bandwidth,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"decode tokens/s at batch {args.batch}: base {best['base']:.1f}, {ADAPTERS} adapters {best['multi_lora']:.1f} "
          f"(x{ratio:.2f}, goal >= {GOAL}), pool with every row on the base {best['pool_all_base']:.1f}; "
          f"fraction of the decode limit ({limit:.0f} tokens/s): base {best['base'] / limit:.2f}, "
          f"multi-LoRA {best['multi_lora'] / limit:.2f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
