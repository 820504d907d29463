"""Prometheus metrics of one server (names follow vLLM's `vllm:` metrics, under `rsdjax:`).

The gauges and counters that routers read to balance load (vllm-router's power_of_two and
sticky_least_loaded read `vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc`) are exported under vLLM's own names too, so rsdjax servers can stand
behind a router written for vLLM. Each server gets its own CollectorRegistry, so several servers
can live in one process (tests).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# latency buckets in seconds: from a fast CPU decode step up to minutes for long generations
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PER_TOKEN = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        label = {"model_name": model_name}

        def g(name, doc):
            return Gauge(f"rsdjax:{name}", doc, list(label), registry=r).labels(**label)

        def g2(name, doc):  # under vLLM's name as well
            return _Both(g(name, doc), Gauge(f"vllm:{name}", doc, list(label), registry=r).labels(**label))

        def c2(name, doc):
            return _Both(*(Counter(f"{prefix}:{name}", doc, list(label), registry=r).labels(**label)
                           for prefix in ("rsdjax", "vllm")))

        def h(name, doc, buckets):
            return Histogram(f"rsdjax:{name}", doc, list(label), buckets=buckets, registry=r).labels(**label)

        self.running = g2("num_requests_running", "requests in a decode slot")
        self.waiting = g2("num_requests_waiting", "requests queued for a slot")
        self.slot_usage = g("slot_usage_perc", "fraction of decode slots in use (0-1)")
        self.kv_cache_usage = g2("kv_cache_usage_perc", "fraction of KV-cache positions holding tokens (0-1)")
        self.ttft = h("time_to_first_token_seconds", "arrival to first token", _LATENCY)
        self.tpot = h("time_per_output_token_seconds", "mean time between output tokens of a request", _PER_TOKEN)
        self.e2e = h("e2e_request_latency_seconds", "arrival to last token", _LATENCY)
        self.queue_time = h("request_queue_time_seconds", "arrival to start of prefill", _LATENCY)
        self.prompt_tokens = c2("prompt_tokens", "prefilled prompt tokens")
        self.generation_tokens = c2("generation_tokens", "generated tokens")
        self._requests = Counter("rsdjax:request_success", "finished requests by finish reason (abort: client gone or error)",
                                 [*label, "finished_reason"], registry=r)
        self._errors = Counter("rsdjax:request_errors", "requests refused or failed, by HTTP status",
                               [*label, "status"], registry=r)
        self._label = label
        for reason in ("stop", "length", "abort"):  # so that every series exists (at 0) from the start
            self._requests.labels(**label, finished_reason=reason)

    def finished(self, reason: str) -> None:
        self._requests.labels(**self._label, finished_reason=reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(**self._label, status=str(status)).inc()


class _Both:
    """One value kept in two metrics (rsdjax's name and vLLM's)."""

    def __init__(self, *metrics):
        self.metrics = metrics

    def set(self, value) -> None:
        for m in self.metrics:
            m.set(value)

    def inc(self, amount=1) -> None:
        for m in self.metrics:
            m.inc(amount)
