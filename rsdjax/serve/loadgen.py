"""A load generator for OpenAI-compatible servers, measuring what `vllm bench serve` measures.

Random token-id prompts of a fixed input length, `max_tokens` = output length with ignore_eos (so
every request does the same work), streamed so that each token's arrival is timed. Requests start
either as fast as a concurrency cap allows, or at Poisson arrivals of a given rate (optionally also
capped). Metrics: completed / failed, request throughput, output and total tokens/s, and
TTFT, TPOT (per request: (latency - TTFT) / (output tokens - 1)), ITL (gaps between chunks), and
end-to-end latency, each as mean / median / p99 in milliseconds.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time

import httpx
import numpy as np


@dataclasses.dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None


def random_prompts(n: int, input_len: int, vocab_size: int, seed: int, low: int = 8) -> list[list[int]]:
    """`n` prompts of `input_len` uniform random token ids (skipping the first `low`, where special tokens live)."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, vocab_size, size=(n, input_len)).tolist()


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int,
               headers: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage = [], None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=chunk["error"].get("message"))
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as e:
        return RequestResult(False, error=repr(e))
    if not times or usage is None:
        return RequestResult(False, error="stream ended without tokens or usage")
    return RequestResult(True, usage["prompt_tokens"], usage["completion_tokens"], times[0] - start,
                         times[-1] - start, list(np.diff(times)))


async def run_load(url: str, model: str, prompts: list[list[int]], output_len: int | list[int],
                   concurrency: int | None = None, request_rate: float = math.inf, seed: int = 0,
                   api_key: str | None = None, timeout: float = 600.0,
                   delays: list[float] | None = None) -> tuple[list[RequestResult], float]:
    """Send every prompt once; return the results (in prompt order) and the wall time of the run.

    `output_len`: one for all or one per prompt. `delays`: when each request starts, in seconds from
    the start of the run (instead of Poisson arrivals at `request_rate`)."""
    limit = asyncio.Semaphore(concurrency or len(prompts))
    lens = list(output_len) if isinstance(output_len, (list, tuple)) else [output_len] * len(prompts)
    if delays is not None:
        gaps = np.diff(np.concatenate([[0.0], np.asarray(delays, float)]))
        if len(gaps) != len(prompts) or (gaps < 0).any():
            raise ValueError("run_load: delays must be one non-decreasing start time per prompt")
    elif math.isfinite(request_rate):
        gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, len(prompts))
    else:
        gaps = np.zeros(len(prompts))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def limited(prompt, n):
            async with limit:
                return await _one(client, url, model, prompt, n, headers)

        start = time.perf_counter()
        tasks = []
        for prompt, n, gap in zip(prompts, lens, gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(prompt, n)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def _stats(values_s: list[float]) -> dict:
    if not values_s:
        return {"mean_ms": None, "median_ms": None, "p99_ms": None}
    ms = np.asarray(values_s) * 1000.0
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def summarize(results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    inp, out = sum(r.prompt_tokens for r in ok), sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": inp, "total_output_tokens": out,
        "request_throughput": len(ok) / duration, "output_throughput": out / duration,
        "total_token_throughput": (inp + out) / duration,
        "ttft": _stats([r.ttft for r in ok]),
        "tpot": _stats([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        "itl": _stats([gap for r in ok for gap in r.itl]),
        "e2el": _stats([r.latency for r in ok]),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def format_summary(name: str, s: dict) -> str:
    lines = [f"== {name}: {s['completed']} completed, {s['failed']} failed in {s['duration_s']:.2f} s",
             f"   request throughput {s['request_throughput']:.2f} req/s, output {s['output_throughput']:.1f} tok/s, "
             f"total {s['total_token_throughput']:.1f} tok/s"]
    for key in ("ttft", "tpot", "itl", "e2el"):
        v = s[key]
        if v["mean_ms"] is not None:
            lines.append(f"   {key.upper():5s} mean {v['mean_ms']:9.2f} ms  median {v['median_ms']:9.2f} ms  "
                         f"p99 {v['p99_ms']:9.2f} ms")
    return "\n".join(lines)
