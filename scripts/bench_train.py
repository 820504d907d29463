#!/usr/bin/env python
"""Training throughput: the rsdjax train step vs a plain PyTorch AdamW loop on the same Llama.

Same model (HF `LlamaForCausalLM` for PyTorch, rsdjax's Llama for JAX), same batch, float32,
AdamW with gradient clipping, one device. PyTorch under bfloat16 autocast runs as a reference
ceiling. MFU is against this machine's float32 matmul peak, measured here through JAX and
through PyTorch (the larger is the machine peak). Writes bench_results/train.json.

    python scripts/bench_train.py            # hidden 512, 8 layers, 8/4 heads, vocab 8192, 8 x 256
    python scripts/bench_train.py --quick    # tiny sizes, a smoke run (seconds)
The machine is shared: numbers move with other load (the JSON records the load average).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=8192, intermediate=1408, batch=8, seq=256, steps=8)
QUICK = dict(hidden=128, layers=2, heads=4, kv_heads=2, vocab=512, intermediate=256, batch=2, seq=64, steps=2)
LR, WD, B1, B2, EPS, CLIP = 1e-4, 0.1, 0.9, 0.95, 1e-8, 1.0


def model_config(s):
    from rsdjax.config import ModelConfig

    return ModelConfig(name="bench", vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                       num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["kv_heads"],
                       max_position_embeddings=s["seq"], rope_theta=10000.0, param_dtype="float32",
                       dtype="float32").validate()


def batch_arrays(s, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.integers(0, s["vocab"], (s["batch"], s["seq"] + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(s["seq"], dtype=np.int32), (s["batch"], s["seq"])).copy()
    return {"tokens": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((s["batch"], s["seq"]), np.float32),
            "segment_ids": np.ones((s["batch"], s["seq"]), np.int32), "positions": pos}


def time_steps(step, steps: int, warmup: int = 2, finish=lambda: None) -> tuple[float, list[float]]:
    """(first step seconds incl. compile, timed step seconds). `finish` waits for a step that `step`
    only dispatched, so the first figure covers its run too; timed steps overlap as in training."""
    t = time.perf_counter()
    step()
    finish()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return first, times


# ---------------------------------------------------------------- peaks


def matmul_peak_jax(n: int, reps: int) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def matmul_peak_torch(n: int, reps: int) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ---------------------------------------------------------------- the contenders


def run_rsdjax(s, scan_layers: bool = True):
    import jax
    from flax import nnx

    from rsdjax.model.llama import Llama
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.parallel.sharding import create_sharded
    from rsdjax.train.config import OptimConfig
    from rsdjax.train.optimizer import make_optimizer
    from rsdjax.train.step import TrainStep

    cfg = dataclasses.replace(model_config(s), scan_layers=scan_layers)
    mesh = make_mesh({})  # one device: virtual CPU devices share the same cores
    model = create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh, "train")
    optim = OptimConfig(lr=LR, warmup_steps=0, decay="constant", weight_decay=WD, b1=B1, b2=B2, eps=EPS, clip_norm=CLIP)
    tx, schedule = make_optimizer(optim, 1000)
    ts = TrainStep(model, tx, mesh, schedule=schedule)
    params, frozen = ts.split(model)
    box = {"state": ts.init(params)}
    batch = jax.device_put(batch_arrays(s), ts.batch_sharding)

    def step():
        box["state"], m = ts(box["state"], frozen, batch)
        if "metrics" in box:  # the previous step's loss, read after this one is dispatched, as the training loop does
            float(box["metrics"]["loss"])
        box["metrics"] = m

    first, times = time_steps(step, s["steps"], finish=lambda: jax.block_until_ready(box["metrics"]))
    return {"first_step_s": first, "step_s": times, "loss": float(box["metrics"]["loss"])}


def run_torch(s, autocast: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=s["seq"], rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float().train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}],
                            lr=LR, betas=(B1, B2), eps=EPS)
    b = batch_arrays(s)
    tokens, targets = torch.from_numpy(b["tokens"]).long(), torch.from_numpy(b["targets"]).long()
    box = {}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        box["loss"] = loss.item()

    first, times = time_steps(step, s["steps"])
    return {"first_step_s": first, "step_s": times, "loss": box["loss"]}


def summarise(result, tokens_per_step, flops_per_token, peaks):
    med = statistics.median(result["step_s"])
    tps = tokens_per_step / med
    out = {"median_step_s": med, "tokens_per_s": tps, "gflops": tps * flops_per_token / 1e9,
           "mfu": tps * flops_per_token / peaks["machine"], "first_step_s": result["first_step_s"],
           "loss_after": result["loss"], "step_s": result["step_s"]}
    return out


# rsdjax_f32: the default config; rsdjax_f32_unrolled: model.scan_layers=false (layers unrolled)
CONTENDERS = {"rsdjax_f32": (run_rsdjax, ()), "rsdjax_f32_unrolled": (run_rsdjax, (False,)),
              "torch_f32": (run_torch, (False,)), "torch_bf16_autocast": (run_torch, (True,))}


def child(name: str, s: dict, n: int, reps: int) -> dict:
    """One measurement in this (fresh) process."""
    if name == "peak_jax":
        return {"flops": matmul_peak_jax(n, reps)}
    if name == "peak_torch":
        return {"flops": matmul_peak_torch(n, reps)}
    fn, extra = CONTENDERS[name]
    return fn(s, *extra)


def in_subprocess(name: str, args) -> dict:
    """Each contender runs in its own process: no framework's thread pool competes with another's,
    and JAX sees one CPU device (the Makefile's 8 virtual devices would only split the same cores)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, __file__, "--child", name] + (["--quick"] if args.quick else [])
    cmd += ["--steps", str(args.steps)] if args.steps else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--steps", type=int, help="timed steps per contender")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "train.json")
    p.add_argument("--skip-bf16", action="store_true", help="skip the PyTorch bfloat16 autocast reference")
    p.add_argument("--rounds", type=int, default=2, help="runs per contender, alternating; the best counts")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    s = dict(QUICK if args.quick else FULL)
    if args.steps:
        s["steps"] = args.steps
    n, reps = (256, 3) if args.quick else (2048, 5)
    if args.child:
        print(json.dumps(child(args.child, s, n, reps)))
        return 0

    from rsdjax.train.metrics import flops_per_token

    cfg = model_config(s)
    fpt = flops_per_token(cfg, s["seq"])
    load_before = os.getloadavg()
    peaks = {"jax_f32_matmul": in_subprocess("peak_jax", args)["flops"],
             "torch_f32_matmul": in_subprocess("peak_torch", args)["flops"]}
    peaks["machine"] = max(peaks["jax_f32_matmul"], peaks["torch_f32_matmul"])
    print(f"f32 matmul peak ({n}x{n}): JAX {peaks['jax_f32_matmul'] / 1e9:.0f} GFLOP/s, "
          f"PyTorch {peaks['torch_f32_matmul'] / 1e9:.0f} GFLOP/s", flush=True)
    tokens = s["batch"] * s["seq"]
    results, rounds = {}, []
    names = [n for n in CONTENDERS if not (n == "torch_bf16_autocast" and args.skip_bf16)]
    for r in range(args.rounds):  # alternate the contenders; keep each one's least disturbed round
        for name in names:
            got = summarise(in_subprocess(name, args), tokens, fpt, peaks)
            rounds.append({"round": r, "name": name, "tokens_per_s": got["tokens_per_s"]})
            print(f"  round {r} {name:>20}: {got['tokens_per_s']:8,.0f} tokens/s", flush=True)
            if name not in results or got["tokens_per_s"] > results[name]["tokens_per_s"]:
                results[name] = got
    for name, r in results.items():
        print(f"{name:>20}: {r['tokens_per_s']:8,.0f} tokens/s  {r['gflops']:6.1f} GFLOP/s  MFU {r['mfu']:.1%}  "
              f"(step {r['median_step_s'] * 1e3:.0f} ms, first {r['first_step_s']:.1f} s)", flush=True)
    ratio = results["rsdjax_f32"]["tokens_per_s"] / results["torch_f32"]["tokens_per_s"]
    xla_mfu = results["rsdjax_f32"]["gflops"] * 1e9 / peaks["jax_f32_matmul"]
    unrolled = results["rsdjax_f32_unrolled"]["tokens_per_s"] / results["torch_f32"]["tokens_per_s"]
    # issue #14's targets: >= 1.3x the PyTorch f32 loop, and >= 80% of the measured XLA f32 matmul peak
    print(f"rsdjax / PyTorch f32 = {ratio:.2f}x (unrolled layers {unrolled:.2f}x; target >= 1.3x); rsdjax at "
          f"{xla_mfu:.1%} of the XLA f32 matmul peak (target >= 80%)")
    import jax

    report = {"benchmark": "train", "sizes": s, "params": cfg.num_params(), "flops_per_token": fpt,
              "tokens_per_step": tokens, "peaks_flops": peaks, "results": results, "rounds": rounds, "ratio_rsdjax_vs_torch_f32": ratio,
              "ratio_rsdjax_unrolled_vs_torch_f32": unrolled,
              "rsdjax_fraction_of_xla_peak": xla_mfu, "targets": {"ratio_vs_torch_f32": 1.3, "fraction_of_xla_peak": 0.8},
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "quick": args.quick,
              "note": "shared 2-core machine; other processes may have been running (see load averages)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
