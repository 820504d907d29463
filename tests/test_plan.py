"""The planner reproduces the seeds' facts, from its own output (no compilation here).

seed 002: Llama 3.1-70B in FP16 is ~140 GB over 80 layers; it needs 4 CS-3s (44 GB each), 20 layers each.
seed 000: Llama-3-8B in FP16 (~16 GB) does not fit one ATOM card (16 GB), runs tensor-parallel over
cards; a rack is 14 servers x 16 cards at 35 kW and scales linearly with servers behind a router.
"""
import json

import pytest

from rsdjax.cli import main
from rsdjax.config import load_model_config
from rsdjax.hardware import load_hardware
from rsdjax.plan.cost_model import Assumptions, Workload, link_for
from rsdjax.plan.estimate import estimate
from rsdjax.plan.planner import evaluate, factorizations, plan_all, scaling

INFER = Workload("infer", 0, 4096)  # best batch per plan, 2K prompt + 2K output (the RSD benchmark)


def one(**axes):
    return {"data": 1, "stage": 1, "fsdp": 1, "tensor": 1, **axes}


@pytest.fixture(scope="module")
def llama70b():
    return load_model_config("llama3.1-70b")


@pytest.fixture(scope="module")
def llama8b():
    return load_model_config("llama3-8b")


def test_llama70b_fp16_is_140gb_in_80_layers(llama70b):
    est = estimate(llama70b, load_hardware("cs3x4"), one(), Workload("infer", 1, 4096))
    assert llama70b.num_layers == 80
    assert 139e9 < est.memory.weights < 142e9  # FP16: 2 bytes per parameter


@pytest.mark.parametrize("systems", [1, 2, 3])
def test_llama70b_does_not_fit_on_fewer_than_four_cs3(llama70b, systems):
    hw = load_hardware("cs3", [f"nodes={systems}"])
    plans = plan_all(llama70b, hw, INFER)
    assert len(plans) == len(factorizations(systems)) and not any(p.fits for p in plans)
    memory_rejections = [p for p in plans if p.estimate is not None]
    assert memory_rejections and all(p.reason.startswith("needs") for p in memory_rejections)
    assert min(p.estimate.memory.weights for p in memory_rejections) > hw.device.usable_bytes


def test_llama70b_fits_four_cs3_with_20_layers_each(llama70b):
    plans = plan_all(llama70b, load_hardware("cs3x4"), INFER)
    staged = next(p for p in plans if p.mesh == one(stage=4))
    assert staged.fits and staged.layers_per_stage(llama70b) == 20
    assert staged.estimate.memory.total <= 44e9
    # layers across systems beat tensor parallelism over the fabric: 3 hops per token, not 160 all-reduces
    assert plans[0].mesh == one(stage=4)
    tensor4 = next(p for p in plans if p.mesh == one(tensor=4))
    assert tensor4.estimate.times["decode_comm_s"] > 10 * staged.estimate.times["decode_comm_s"]


def test_llama3_8b_fp16_does_not_fit_one_atom_card(llama8b):
    hw = load_hardware("atom-card")
    (plan,) = plan_all(llama8b, hw, INFER)
    assert not plan.fits
    assert 16.0e9 < plan.estimate.memory.weights > hw.device.usable_bytes
    assert "weights 16.06 GB" in plan.reason and "15.71 GB usable" in plan.reason


@pytest.mark.parametrize("cards", [2, 4, 8, 16])
def test_llama3_8b_fits_two_or_more_atom_cards_with_tensor_parallelism(llama8b, cards):
    hw = load_hardware("atom-server", [f"devices_per_node={cards}"])
    tp = evaluate(llama8b, hw, one(tensor=cards), INFER, Assumptions())
    assert tp.fits and tp.estimate.workload.batch >= 1
    replicas = evaluate(llama8b, hw, one(data=cards), INFER, Assumptions())
    assert not replicas.fits  # whole copies per card still do not fit
    best = plan_all(llama8b, hw, INFER)[0]
    assert best.fits and best.mesh["tensor"] >= 2


def test_atom_rack_is_14_servers_of_16_cards_and_scales_linearly(llama8b):
    rack = load_hardware("atom-rack")
    assert (rack.nodes, rack.devices_per_node, rack.num_devices, rack.total_power_w) == (14, 16, 224, 35000.0)
    assert len(factorizations(224)) == 224  # (5+3 choose 3) x (1+3 choose 3) for 2^5 x 7
    rows = scaling(llama8b, rack, INFER)
    labels = [row.label for row, _ in rows]
    assert labels[0] == "1 device" and labels[-1] == "14 nodes"
    assert rows[0][0].best is None  # one card: does not fit
    per_server = rows[1][0].best.estimate.tokens_per_s_system
    full, nodes = rows[-1]
    assert full.devices == 224 and full.power_w == 35000.0
    assert full.efficiency(per_server, nodes) == pytest.approx(1.0, rel=1e-6)  # replicas share nothing
    best = full.best.mesh
    assert 16 % best["tensor"] == 0  # tensor groups stay inside a server (PCIe), replicas across servers


def test_memory_units(llama8b):
    hw = load_hardware("atom-server")
    est = estimate(llama8b, hw, one(), Workload("infer", 2, 1024))
    assert est.memory.weights == llama8b.num_params() * 2
    assert est.memory.kv_cache == 2 * 32 * 8 * 128 * 2 * 1024 * 2  # 2 x L x KV x D x B x S x bytes
    split = estimate(llama8b, hw, one(stage=2, tensor=8), Workload("infer", 2, 1024))
    assert split.memory.kv_cache == est.memory.kv_cache / 16
    f32 = estimate(llama8b, hw, one(), Workload("infer", 2, 1024), Assumptions(dtype="float32"))
    assert f32.memory.weights == 2 * est.memory.weights
    train = estimate(llama8b, hw, one(fsdp=4, tensor=4), Workload("train", 8, 512))
    assert train.memory.gradients == train.memory.weights and train.memory.optimizer == 2 * train.memory.weights
    # tensor=16 > 8 KV heads: the rules replicate K/V weights and the whole cache on every card
    t16 = estimate(llama8b, hw, one(tensor=16), Workload("infer", 2, 1024))
    assert t16.memory.kv_cache == est.memory.kv_cache


def test_rejections_say_why():
    tiny = load_model_config("tiny")
    cpu = load_hardware("cpu")
    assert evaluate(tiny, cpu, one(stage=8), INFER, Assumptions()).reason == "2 layers do not split evenly over stage=8"
    llama = load_model_config("llama3-8b")
    rack = load_hardware("atom-rack")
    reason = evaluate(llama, rack, one(data=32, tensor=7), INFER, Assumptions()).reason
    assert reason == "32 query heads do not split evenly over tensor=7"
    train = evaluate(llama, rack, one(data=224), Workload("train", 100, 128), Assumptions()).reason
    assert "global batch 100" in train


def test_links_follow_the_topology():
    rack, assume = load_hardware("atom-rack"), Assumptions(link_efficiency=1.0)
    mesh = one(data=14, tensor=16)
    assert link_for(mesh, "tensor", rack, assume).gbs == 64.0  # PCIe Gen5 card to card
    assert link_for(mesh, "data", rack, assume).gbs == 50.0  # between servers
    assert link_for(one(data=7, tensor=32), "tensor", rack, assume).gbs == 50.0  # spans two servers


def test_pipeline_bubble_and_decode_rounds(llama8b):
    hw = load_hardware("atom-server")
    train = estimate(llama8b, hw, one(stage=4, tensor=4), Workload("train", 16, 1024))
    assert train.microbatches == 16 and train.times["bubble_fraction"] == pytest.approx(3 / 19)
    decode = estimate(llama8b, hw, one(stage=4, tensor=4), Workload("infer", 8, 1024))
    assert decode.microbatches == 4  # S microbatches in flight while decoding


def test_per_query_head_kv_reads_charge_each_query_head_of_a_gqa_group():
    """TensorRT-LLM 0.5's decode kernel reads a KV head once per query head: on tensor=4 Llama-70B's 16 local
    query heads read what 2 cached KV heads hold, 8 times over; an MHA model (Llama-2-7B) is unchanged."""
    hw, wl = load_hardware("h100-node"), Workload("infer", 64, 4096, prompt=2048)
    grouped = Assumptions(attention="flash", kv_reads="grouped")
    per_head = Assumptions(attention="flash", kv_reads="per_query_head")
    cfg70 = load_model_config("llama3.1-70b")
    a, b = (estimate(cfg70, hw, one(tensor=4), wl, x).times["decode_memory_s"] for x in (grouped, per_head))
    mean_context = 2048 + 2048 // 2  # a flash kernel reads the filled cache: the prompt and half the output
    heads, kv_heads = cfg70.num_heads // 4, cfg70.num_kv_heads // 4  # 16 and 2 per device
    extra = 2 * cfg70.num_layers * 64 * mean_context * (heads - kv_heads) * cfg70.resolved_head_dim * 2  # bf16
    assert b - a == pytest.approx(extra / (hw.device.mem_bandwidth_gbs.value * 1e9 * 0.7), rel=1e-6)
    cfg7 = load_model_config("llama2-7b")
    assert estimate(cfg7, hw, one(), wl, grouped).decode_round_s == estimate(cfg7, hw, one(), wl, per_head).decode_round_s


def test_cli_plan_json_names_the_best_mesh(capsys):
    assert main(["plan", "--model", "llama3.1-70b", "--hardware", "cs3x4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["best_mesh"] == "data=1,stage=4,fsdp=1,tensor=1"
    assert len(out["plans"]) == 10 and sum(p["fits"] for p in out["plans"]) == 6
    assert all(p["reason"] for p in out["plans"] if not p["fits"])


def test_cli_plan_table_and_scaling(capsys):
    assert main(["plan", "--model", "llama3-8b", "--hardware", "atom-rack", "--scaling", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "best plan: --mesh" in out and "14 nodes" in out and "(does not fit)" in out


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "tensor=3"], "uses 3 devices"),
    (["--mode", "train", "--batch", "0"], "--batch must be positive"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["cost.dtype=int8"], "unknown dtype"),
    (["cost.attention=fast"], "cost.attention must be 'full' or 'flash'"),
    (["cost.kv_reads=some"], "cost.kv_reads must be 'grouped' or 'per_query_head'"),
    (["model.num_heads=0"], "num_heads must be positive"),
])
def test_cli_plan_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["plan", "--model", "tiny", "--hardware", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
