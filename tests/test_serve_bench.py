"""Smoke test of scripts/bench_serve.py on the fake engine: one server, and a router over two."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_serve_runs_both_scenarios_on_the_fake_engine(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--fake-engine", "--num-prompts", "12",
           "--input-len", "16", "--output-len", "8", "--concurrency", "4", "--fake-step-ms", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert set(result["scenarios"]) == {"server", "router"}
    for s in result["scenarios"].values():
        assert (s["completed"], s["failed"]) == (12, 0)
        assert s["total_input_tokens"] == 12 * 16 and s["total_output_tokens"] == 12 * 8
        assert s["output_throughput"] > 0 and s["request_throughput"] > 0
        for key in ("ttft", "tpot", "itl", "e2el"):
            v = s[key]
            assert 0 < v["mean_ms"] and 0 < v["median_ms"] <= v["p99_ms"]
        assert s["ttft"]["mean_ms"] <= s["e2el"]["mean_ms"]
        assert s["fraction_of_one_engine_limit"] > 0
    assert result["engine_limit"]["decode_tokens_per_s"] > 0
    assert "server: 12 completed, 0 failed" in done.stdout
