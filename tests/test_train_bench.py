"""Smoke test of scripts/bench_train.py at tiny sizes (speed goals live in the benchmark, not here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_train_quick_writes_a_complete_report(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_train.py"), "--quick", "--rounds", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"rsdjax_f32", "rsdjax_f32_unrolled", "torch_f32", "torch_bf16_autocast"}
    scanned, unrolled = report["results"]["rsdjax_f32"], report["results"]["rsdjax_f32_unrolled"]
    assert abs(scanned["loss_after"] - unrolled["loss_after"]) < 1e-4 * abs(scanned["loss_after"])  # same training
    for r in report["results"].values():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and len(r["step_s"]) == report["sizes"]["steps"]
    assert report["peaks_flops"]["machine"] == max(report["peaks_flops"]["jax_f32_matmul"],
                                                   report["peaks_flops"]["torch_f32_matmul"])
    assert report["ratio_rsdjax_vs_torch_f32"] > 0 and report["ratio_rsdjax_unrolled_vs_torch_f32"] > 0
    assert "rsdjax / PyTorch f32" in proc.stdout
