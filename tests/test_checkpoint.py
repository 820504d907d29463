"""HF <-> rsdjax conversion: bit-identical round trip, transformers loads what we write, bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

import rsdjax
from rsdjax.checkpoint.safetensors_io import CheckpointError, index_directory
from rsdjax.cli import main
from conftest import make_hf_llama, max_abs


def _tensors(directory: Path) -> dict:
    return {name: np.asarray(ref.load()) for name, ref in index_directory(directory).items()}


def test_round_trip_is_bit_identical_and_loads_in_transformers(tiny_hf_dir, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    assert main(["convert", "hf-to-rsdjax", "--model", str(tiny_hf_dir), "-o", str(tmp_path / "native"),
                 "--mesh", "fsdp=2,tensor=4"]) == 0  # the shared grammar; SRC DST positionally below
    # a small shard size forces several files + an index, the layout of real checkpoints
    assert main(["convert", "rsdjax-to-hf", str(tmp_path / "native"), str(tmp_path / "hf"),
                 "--max-shard-size", "0.0002"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    before, after = _tensors(tiny_hf_dir), _tensors(tmp_path / "hf")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    original = LlamaForCausalLM.from_pretrained(tiny_hf_dir).eval()
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, original(tokens).logits)


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    hf = make_hf_llama(tmp_path / "src", seed=3)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert main(["convert", "hf-to-rsdjax", str(tmp_path / "bf16"), str(tmp_path / "native")]) == 0
    assert main(["convert", "rsdjax-to-hf", str(tmp_path / "native"), str(tmp_path / "out")]) == 0
    a, b = _tensors(tmp_path / "bf16"), _tensors(tmp_path / "out")
    assert all(a[k].dtype.name == "bfloat16" and np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


def test_load_model_from_rsdjax_checkpoint_on_another_mesh(tiny_hf_dir, tmp_path):
    from rsdjax.loading import save_model
    from rsdjax.parallel.mesh import make_mesh

    model = rsdjax.load_model(tiny_hf_dir, mesh=make_mesh({"tensor": 8}))
    save_model(model, tmp_path / "ck")
    again = rsdjax.load_model(tmp_path / "ck", mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    for name in ("wq", "w_down", "embed", "lm_head"):
        assert np.array_equal(getattr(model, name)[...], getattr(again, name)[...])
    assert again.w_gate[...].sharding.spec == P(None, "fsdp", "tensor")
    tokens = np.arange(10, dtype=np.int32)[None]
    assert max_abs(model(tokens), again(tokens)) <= 1e-5  # other mesh: other reduction order


# ---------------------------------------------------------------- bad input


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _error(capsys, argv) -> str:
    capsys.readouterr()  # drop what fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_wrong_shape_names_the_tensor(tiny_hf_dir, tmp_path, capsys):
    bad = _copy(tiny_hf_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 320
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _error(capsys, ["convert", "hf-to-rsdjax", str(bad), str(tmp_path / "out")])
    assert "'model.layers.0.mlp.down_proj.weight' has shape [128, 256], expected [128, 320]" in err
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    make_hf_llama(tmp_path / "m", seed=4)
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    err = _error(capsys, ["convert", "hf-to-rsdjax", str(tmp_path / "m"), str(tmp_path / "out")])
    assert "'model.layers.1.self_attn.k_proj.weight' is missing" in err


def test_config_that_is_not_llama(tiny_hf_dir, tmp_path, capsys):
    bad = _copy(tiny_hf_dir, tmp_path / "gpt")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    err = _error(capsys, ["convert", "hf-to-rsdjax", str(bad), str(tmp_path / "out")])
    assert "model_type is 'gpt2'" in err and "config.json" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(tiny_hf_dir, tmp_path, capsys, damage):
    bad = _copy(tiny_hf_dir, tmp_path / "corrupt")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"\xff" * 64 + data[72:])
    err = _error(capsys, ["convert", "hf-to-rsdjax", str(bad), str(tmp_path / "out")])
    assert "model.safetensors" in err and "corrupt" in err


def test_existing_output_is_never_overwritten(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = _error(capsys, ["convert", "hf-to-rsdjax", str(tiny_hf_dir), str(out)])
    assert "not empty" in err and (out / "precious.txt").read_text() == "keep me"


def test_non_dividing_mesh_is_a_one_line_error(capsys):
    err = _error(capsys, ["shard-report", "--model", "tiny", "--mesh", "tensor=3"])
    assert "embed" in err and "tensor=3" in err and "'vocab'" in err


def test_bad_override_and_unknown_preset(capsys):
    assert "unknown config key 'model.num_layerz' (did you mean 'model.num_layers'?)" in _error(
        capsys, ["shard-report", "--model", "tiny", "model.num_layerz=3"])
    assert "unknown models preset 'llama9'" in _error(capsys, ["shard-report", "--model", "llama9"])
    assert "unknown mesh axis 'pipe'" in _error(capsys, ["shard-report", "--model", "tiny", "--mesh", "pipe=2"])


def test_index_lists_missing_shard(tiny_hf_dir, tmp_path):
    bad = _copy(tiny_hf_dir, tmp_path / "idx")
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        index_directory(bad)
