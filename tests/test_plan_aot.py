"""The analytic memory estimate is within 15% of XLA's own memory analysis of the compiled steps.

Parameters are shape-only (`plan --aot`): the 1.2B model is compiled for 8 virtual devices without
allocating it. float32 throughout, the CPU backend's dtype (XLA:CPU upcasts bfloat16 matmuls).
"""
import json

import pytest

from rsdjax.cli import main
from rsdjax.config import load_model_config
from rsdjax.hardware import load_hardware
from rsdjax.plan import aot
from rsdjax.plan.cost_model import Assumptions, Workload
from rsdjax.plan.estimate import estimate

TOLERANCE = 0.15
CPU = load_hardware("cpu")


def one(**axes):
    return {"data": 1, "stage": 1, "fsdp": 1, "tensor": 1, **axes}


def check(model: str, overrides: list[str], mesh: dict, wl: Workload):
    cfg = aot.config_for(load_model_config(model, overrides), 4)
    est = estimate(cfg, CPU, mesh, wl, Assumptions())
    compiled = aot.compile_plan(cfg, mesh, wl)
    assert [s.name for s in compiled] == list(est.step_bytes)
    for step in compiled:
        ratio = est.step_bytes[step.name] / step.peak_bytes
        assert abs(ratio - 1) < TOLERANCE, f"{model} {step.name}: estimate/XLA = {ratio:.3f}"
    return compiled


@pytest.mark.parametrize("mesh,wl", [
    (one(data=2, tensor=4), Workload("infer", 4, 128)),
    (one(data=2, tensor=4), Workload("train", 8, 64)),
    (one(fsdp=2, tensor=4), Workload("train", 8, 64)),
], ids=["infer-dp2-tp4", "train-dp2-tp4", "train-fsdp2-tp4"])
def test_tiny_estimate_within_15_percent_of_xla(mesh, wl):
    check("tiny", [], mesh, wl)


@pytest.mark.parametrize("mesh,wl", [
    (one(stage=2, tensor=4), Workload("infer", 4, 64)),
    (one(stage=2, tensor=4), Workload("train", 8, 64)),
], ids=["infer", "train"])
def test_tiny_pipelined_estimate_within_15_percent_of_xla(mesh, wl):
    check("tiny", ["num_layers=4"], mesh, wl)


@pytest.mark.slow
@pytest.mark.parametrize("mesh,wl", [
    (one(tensor=8), Workload("infer", 4, 256)),
    (one(data=2, tensor=4), Workload("train", 4, 256)),
], ids=["infer-tp8", "train-dp2-tp4"])
def test_midsize_estimate_within_15_percent_of_xla(mesh, wl):
    """Llama-3.2-1B (1.24 B params, 16 layers, tied embeddings): weights dominate, activations matter."""
    compiled = check("llama3.2-1b", [], mesh, wl)
    assert compiled[0].argument_bytes > 4e8  # the real model's shards, never allocated


def test_cli_aot_reports_xla_beside_the_estimate(capsys):
    args = ["plan", "--model", "tiny", "--hardware", "cpu", "--mesh", "data=2,tensor=4", "--batch", "2",
            "--seq", "64", "--aot", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    steps = {s["name"]: s for s in out["aot"]["steps"]}
    assert set(steps) == {"prefill", "decode"}
    step_bytes = out["plans"][0]["step_bytes"]
    for name, s in steps.items():
        assert abs(step_bytes[name] / s["peak_bytes"] - 1) < TOLERANCE
        assert s["flops"] > 0 and s["collective_bytes_per_step"] > 0


def test_cli_collectives_of_both_tensor_parallel_paths(capsys):
    assert main(["plan", "--model", "tiny", "--mesh", "tensor=8", "--batch", "2", "--seq", "32",
                 "--collectives"]) == 0
    out = capsys.readouterr().out
    assert "tensor_parallel=compiler" in out and "tensor_parallel=shard_map" in out
    assert out.count("all-reduce") >= 4
