"""`--hardware NAME` without `--mesh` runs the planner's best split; the calibration table is printed."""
import argparse
import json

import pytest

from rsdjax.cli import main
from rsdjax.cli.common import engine_runnable, planned_mesh_shape
from rsdjax.config import load_model_config
from rsdjax.hardware import format_mesh, load_hardware
from rsdjax.plan.cost_model import Workload
from rsdjax.plan.planner import choose


def args(hardware, objective="throughput"):
    return argparse.Namespace(hardware=hardware, mesh=None, objective=objective)


@pytest.mark.parametrize("objective", ["throughput", "latency", "tps-per-watt"])
def test_hardware_picks_the_plan_commands_best_mesh(capsys, objective):
    assert main(["plan", "--model", "llama3-8b", "--hardware", "atom-server", "--objective", objective, "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best_mesh"]
    shape = planned_mesh_shape(args("atom-server", objective), load_model_config("llama3-8b"),
                               Workload("infer", 0, 4096))
    assert format_mesh(shape) == best
    err = capsys.readouterr().err
    assert f"mesh {best}" in err and f"best {objective}" in err and "--mesh overrides it" in err


def test_hardware_picks_the_training_split_plan_ranks_first(capsys):
    assert main(["plan", "--model", "llama3-8b", "--hardware", "atom-server", "--mode", "train", "--batch", "16",
                 "--seq", "1024", "model.remat=true", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best_mesh"]
    cfg = load_model_config("llama3-8b", ["remat=true"])
    assert format_mesh(planned_mesh_shape(args("atom-server"), cfg, Workload("train", 16, 1024))) == best


def test_serve_and_plan_agree_on_the_cs3x4_split(capsys):
    assert main(["plan", "--model", "llama3.1-70b", "--hardware", "cs3x4", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best_mesh"]
    cfg, hw = load_model_config("llama3.1-70b"), load_hardware("cs3x4")
    served, _ = choose(cfg, hw, Workload("infer", 0, 4096), runnable=engine_runnable(8))  # serve's defaults
    assert served.mesh_str == best == "data=1,stage=4,fsdp=1,tensor=1"  # 20 layers per system, pipelined


def test_serving_skips_splits_the_engine_cannot_run():
    cfg, hw = load_model_config("llama3.1-70b"), load_hardware("cs3x4")
    with pytest.raises(ValueError, match="cannot run here"):
        choose(cfg, hw, Workload("infer", 0, 4096), runnable=lambda mesh: "no")
    plan, reason = choose(load_model_config("llama3-8b"), load_hardware("atom-server"), Workload("infer", 0, 4096),
                          runnable=engine_runnable(6))
    assert 6 % plan.mesh["data"] == 0 and plan.mesh["stage"] == 1 and "fit" in reason


@pytest.mark.parametrize("engine_args,words", [
    ({"engine": "paged"}, "the paged engine"),
    ({"engine": "slots", "quantize": "int8"}, "--quantize int8"),
    ({"engine": "slots", "quantize": None, "max_loras": 2, "lora": []}, "per-request LoRA adapters"),
])
def test_serving_stays_on_one_stage_when_the_engine_options_need_it(engine_args, words):
    """The pipelined engine refuses these (tests/test_infer_pipelined.py), so --hardware skips cs3x4's stage=4."""
    cfg, hw = load_model_config("llama3.1-70b"), load_hardware("cs3x4")
    plan, reason = choose(cfg, hw, Workload("infer", 0, 4096),
                          runnable=engine_runnable(8, argparse.Namespace(**engine_args)))
    assert plan.mesh["stage"] == 1 and f"stage=4,fsdp=1,tensor=1 ({words}" in reason and "stage=1 only" in reason
    merged = argparse.Namespace(engine="slots", quantize=None, lora=["adapter"])  # generate: applied to the weights
    assert choose(cfg, hw, Workload("infer", 0, 4096), runnable=engine_runnable(8, merged))[0].mesh["stage"] == 4


def test_train_cli_hardware_runs_the_planned_split(capsys, tmp_path):
    from rsdjax.cli.train import train_workload
    from rsdjax.train.config import load_train_config

    cfg = load_train_config("cpt-demo", [f"run_dir={tmp_path}"])
    expected, _ = choose(cfg.model, load_hardware("cpu"), train_workload(cfg))
    assert main(["train", "cpt-demo", f"run_dir={tmp_path}", "--hardware", "cpu", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert f"--hardware cpu: mesh {expected.mesh_str} for " in captured.err
    assert expected.mesh_str in captured.out + captured.err  # the dry run reports the mesh it lowered on


def test_calibration_table_meets_the_fit_and_holdout_targets(capsys):
    assert main(["plan", "--calibration", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    roles = {p["role"] for p in out["points"]}
    assert roles == {"fit", "holdout", "excluded"} and len(out["constants"]) == 6
    for p in out["points"]:  # the targets: fitted points within 15%, held-out points within 30%
        if p["role"] == "fit":
            assert abs(p["error"]) <= 0.15, p
        elif p["role"] == "holdout":
            assert abs(p["error"]) <= 0.30, p


def test_serve_and_warmup_share_the_planned_split(tmp_path_factory, capsys):
    from infer_support import confident_hf_dir
    from rsdjax.cli.common import serving_mesh
    from rsdjax.loading import read_model_config
    from rsdjax.parallel.mesh import mesh_shape_of

    model = confident_hf_dir(tmp_path_factory)
    ns = argparse.Namespace(model=model, hardware="cpu", mesh=None, objective="throughput")
    expected, _ = choose(read_model_config(model), load_hardware("cpu"), Workload("infer", 0, 128),
                         runnable=engine_runnable(8))
    assert mesh_shape_of(serving_mesh(ns, 8, 128)) == expected.mesh
    assert f"mesh {expected.mesh_str}" in capsys.readouterr().err


@pytest.mark.parametrize("entry,message", [
    ("{id: a, what: x, model: tiny, hardware: cpu, workload: {mode: infer, batch: 1, seq: 8}, metric: speed, "
     "measured: 1, role: fit}", "metric must be one of"),
    ("{id: a, what: x, model: tiny, hardware: cpu, workload: {mode: infer, batch: 1, seq: 8}, "
     "metric: stream_output_tok_s, measured: 1, role: maybe}", "role must be one of"),
    ("{id: a, model: tiny}", "missing 'what'"),
])
def test_bad_measurement_files_name_file_and_point(tmp_path, entry, message):
    from rsdjax.config import ConfigError
    from rsdjax.plan.calibration import load_points

    (tmp_path / "m.yaml").write_text(f"points:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_points(tmp_path)
    assert "m.yaml: point a" in str(err.value)
