"""Sharded execution == one device; the rule resolver's semantics; golden sharding snapshots."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import rsdjax
from rsdjax.config import load_model_config
from rsdjax.hardware import load_hardware
from rsdjax.loading import abstract_model
from rsdjax.parallel.mesh import DeviceCountError, make_mesh
from rsdjax.parallel.rules import INFER_RULES, TRAIN_RULES, ShardingError, resolve
from rsdjax.parallel.sharding import shard_report, spec_str
from conftest import max_abs

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def reference_logits(tiny_hf_dir):
    tokens = np.random.RandomState(1).randint(0, 512, (2, 24)).astype(np.int32)
    return tokens, np.asarray(rsdjax.load_model(tiny_hf_dir)(tokens))


@pytest.mark.parametrize("mesh", ["tensor=8", "fsdp=2,tensor=4", "data=2,tensor=4", "stage=2,tensor=4"])
@pytest.mark.parametrize("rules", ["infer", "train"])
def test_sharded_logits_equal_one_device(mesh, rules, tiny_hf_dir, reference_logits):
    from rsdjax.hardware import parse_mesh
    from rsdjax.parallel.rules import RULES, activation_sharding

    tokens, expected = reference_logits
    m = make_mesh(parse_mesh(mesh))
    model = rsdjax.load_model(tiny_hf_dir, mesh=m, rules=rules)
    assert len(model.wq[...].sharding.device_set) == 8  # really spread over the mesh
    with activation_sharding(m, RULES[rules]):
        logits = model(tokens)
    assert max_abs(logits, expected) <= 1e-5


def test_resolver_first_match_wins_and_drops_unusable_axes():
    mesh = {"data": 2, "stage": 1, "fsdp": 2, "tensor": 4}
    # stage has size 1 -> dropped; fsdp is taken by batch first -> embed cannot reuse it
    assert resolve(("batch", "seq", "embed"), (8, 16, 64), mesh, TRAIN_RULES) == P(("data", "fsdp"))
    assert resolve(("layers", "embed", "q_heads", "head_dim"), (2, 64, 8, 16), mesh, TRAIN_RULES) == P(None, "fsdp", "tensor")
    rules = (("vocab", "tensor"), ("vocab", "fsdp"))
    assert resolve(("vocab",), (8,), mesh, rules) == P("tensor")  # first row wins while it divides


def test_resolver_explicit_fallback_replicates_kv_heads():
    mesh = {"data": 1, "stage": 1, "fsdp": 1, "tensor": 16}
    assert resolve(("layers", "embed", "kv_heads", "head_dim"), (32, 4096, 8, 128), mesh, INFER_RULES) == P()


def test_resolver_non_dividing_size_names_everything():
    mesh = {"data": 1, "stage": 1, "fsdp": 1, "tensor": 3}
    with pytest.raises(ShardingError) as e:
        resolve(("vocab", "embed"), (512, 128), mesh, INFER_RULES, name="embed")
    msg = str(e.value)
    for part in ("embed", "(512, 128)", "'vocab'", "tensor=3"):
        assert part in msg


def test_mesh_larger_than_device_count_says_how_to_fix():
    with pytest.raises(DeviceCountError, match="xla_force_host_platform_device_count=16"):
        make_mesh({"tensor": 16})


def _snapshot(model: str, hardware: str, mode: str, mesh=None) -> dict:
    cfg = load_model_config(model, ["param_dtype=bfloat16"] if model != "tiny" else ["param_dtype=float32"])
    shape = mesh or load_hardware(hardware).mesh_shape()
    from flax import nnx

    _, state = nnx.split(abstract_model(cfg))
    rows = shard_report(state, shape, mode)
    return {r.name: {"logical": list(r.logical), "spec": spec_str(r.spec), "bytes_per_device": r.bytes_per_device}
            for r in rows}


@pytest.mark.parametrize("model,hardware,mode,mesh", [
    ("tiny", "cpu", "train", {"data": 1, "stage": 1, "fsdp": 2, "tensor": 4}),
    ("llama3-8b", "atom-server", "infer", None),
])
def test_golden_sharding_snapshot(model, hardware, mode, mesh):
    """A change of rules shows up here in review. Regenerate with RSDJAX_UPDATE_GOLDEN=1."""
    path = GOLDEN / f"{model}_{hardware}_{mode}.json"
    got = _snapshot(model, hardware, mode, mesh)
    if os.environ.get("RSDJAX_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())
