"""PEFT adapters both ways, checked against `peft` on `transformers` LlamaForCausalLM (float32)."""
import json

import jax
import numpy as np
import pytest

from conftest import make_hf_llama, max_abs
from rsdjax.checkpoint.peft import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from rsdjax.checkpoint.safetensors_io import CheckpointError
from rsdjax.cli import main
from rsdjax.loading import load_model
from rsdjax.checkpoint.peft import apply_adapter
from rsdjax.model.lora import LoraConfig, attach_lora

TOKENS = np.random.default_rng(1).integers(0, 512, (2, 20)).astype(np.int32)


def hf_model(path):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_logits(model, tokens=TOKENS):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def peft_config(**kw):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **kw)


def randomize(model, seed):
    """Random A and B on the adapted rows (as after training), zero elsewhere."""
    rng = np.random.default_rng(seed)
    for k in model.lora.layers:
        rows = (np.asarray(model.lora.scale[k][...]) != 0).astype(np.float32)
        for var in (model.lora.a[k], model.lora.b[k]):
            value = rng.normal(0, 0.05, var.shape).astype(np.float32) * rows.reshape(-1, *[1] * (len(var.shape) - 1))
            var[...] = jax.device_put(value, var[...].sharding)


@pytest.mark.parametrize("config", [
    LoraConfig(r=8, alpha=16, target_modules="all-linear", use_rslora=True),
    LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1]),
    LoraConfig(r=4, alpha=6,
               target_modules=r"model\.layers\.0\.(self_attn\.o_proj|mlp\.up_proj)|.*\.1\.self_attn\.k_proj"),
], ids=["all-linear-rslora", "names-layer1", "regex-mixed-layers"])
def test_rsdjax_adapter_loads_in_peft(tiny_hf_dir, tmp_path, config):
    from peft import PeftModel

    model = attach_lora(load_model(tiny_hf_dir), config, seed=2)
    randomize(model, seed=3)
    ours = np.asarray(model(TOKENS))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_hf_dir))
    peft_model = PeftModel.from_pretrained(hf_model(tiny_hf_dir), tmp_path / "adapter").eval()
    n_layers = sum(len(v) for v in model.lora.layers.values())
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")]) == n_layers
    assert max_abs(torch_logits(peft_model), ours) <= 1e-4
    assert max_abs(torch_logits(hf_model(tiny_hf_dir)), ours) > 1e-2  # the adapter matters


@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=8, target_modules="all-linear"),
    dict(r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "gate_proj"], layers_to_transform=[0], use_rslora=True),
], ids=["all-linear", "names-layer0-rslora"])
def test_peft_adapter_loads_in_rsdjax(tiny_hf_dir, tmp_path, kwargs):
    import torch
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(hf_model(tiny_hf_dir), peft_config(**kwargs))
    with torch.no_grad():  # B starts at zero: give it values, as training would
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = torch_logits(peft_model.eval())
    model = apply_adapter(load_model(tiny_hf_dir), tmp_path / "peft")
    assert max_abs(model(TOKENS), expected) <= 1e-4


def test_merge_cli_writes_a_transformers_model(tiny_hf_dir, tmp_path):
    model = attach_lora(load_model(tiny_hf_dir), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    randomize(model, seed=5)
    unmerged = np.asarray(model(TOKENS))
    save_adapter(model, tmp_path / "adapter")
    assert main(["lora", "merge", str(tiny_hf_dir), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert max_abs(torch_logits(hf_model(tmp_path / "merged")), unmerged) <= 1e-4
    # refuses to write over it, and leaves it intact
    before = (tmp_path / "merged" / "model.safetensors").read_bytes()
    assert main(["lora", "merge", str(tiny_hf_dir), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 2
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------- bad adapters


@pytest.fixture(scope="module")
def other_base_adapters(tmp_path_factory):
    """PEFT adapters made for two different bases: narrower (hidden 64) and deeper (3 layers)."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("other_bases")
    out = {}
    for name, overrides in (("narrow", dict(hidden_size=64, intermediate_size=128)),
                            ("deep", dict(num_hidden_layers=3))):
        base = make_hf_llama(root / f"{name}_base", seed=4, **overrides)
        get_peft_model(base, peft_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])) \
            .save_pretrained(root / name)
        out[name] = root / name
    return out


def test_adapter_for_a_different_base_is_refused(tiny_hf_dir, other_base_adapters):
    model = load_model(tiny_hf_dir)
    with pytest.raises(CheckpointError, match=r"q_proj.lora_A.weight' has shape \[4, 64\], expected \[4, 128\]"):
        apply_adapter(model, other_base_adapters["narrow"])
    with pytest.raises(CheckpointError, match=r"layers.2.self_attn.q_proj.lora_A.weight' matches no adapted module"):
        apply_adapter(model, other_base_adapters["deep"])
    assert getattr(model, "lora", None) is None


def test_unusable_adapter_directories(tiny_hf_dir, tmp_path):
    model = attach_lora(load_model(tiny_hf_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    good = save_adapter(model, tmp_path / "good")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_adapter(model, good)
    base = load_model(tiny_hf_dir)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        apply_adapter(base, tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / WEIGHTS_FILE).write_bytes((good / WEIGHTS_FILE).read_bytes())
    config = json.loads((good / CONFIG_FILE).read_text())
    for change, message in ((dict(use_dora=True), "use_dora=True is not supported"),
                            (dict(target_modules=["q_proj", "c_attn"]), "'c_attn' matches no module"),
                            (dict(r=8), r"has shape \[4, 128\], expected \[8, 128\]"),
                            (dict(target_modules=["q_proj", "k_proj"]), "k_proj.lora_A.weight' is missing")):
        (bad / CONFIG_FILE).write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            apply_adapter(base, bad)
    (bad / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        apply_adapter(base, bad)
