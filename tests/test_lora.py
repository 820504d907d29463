"""LoRA on the NNX Llama: the transform, its init, targets, merge/unmerge, dropout, bad configs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import max_abs
from rsdjax.loading import load_model
from rsdjax.model.lora import (LoRAParam, LoraConfig, LoraError, attach_lora, detach_lora, merge,
                               merge_and_unload, resolve_targets, unmerge)

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 24)), jnp.int32)
BASE_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def randomize_b(model, seed=1, std=0.05):
    """Give B non-zero values (training would), so the adapter actually changes the output."""
    rng = np.random.default_rng(seed)
    for k in model.lora.layers:
        b = model.lora.b[k]
        b[...] = jax.device_put(rng.normal(0, std, b.shape).astype(np.float32) * (np.asarray(model.lora.scale[k][...])
                                 != 0).reshape(-1, *[1] * (b.ndim - 1)), b[...].sharding)


@pytest.fixture(scope="module")
def base_logits(tiny_hf_dir):
    return np.asarray(load_model(tiny_hf_dir)(TOKENS))


def test_lora_at_init_equals_base(tiny_hf_dir, base_logits):
    model = attach_lora(load_model(tiny_hf_dir), LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    assert sorted(model.lora.layers) == sorted(BASE_NAMES)
    for k in BASE_NAMES:
        assert not np.any(np.asarray(model.lora.b[k][...])), "B must start at zero"
        assert np.all(np.abs(np.asarray(model.lora.a[k][...])) > 0)
    # B = 0 makes the LoRA term exactly zero; only XLA's fusion of the extra einsums can move the last bit
    assert max_abs(model(TOKENS), base_logits) <= 1e-5


def test_a_init_is_peft_kaiming_uniform(tiny_hf_dir):
    """A ~ U(-b, b) with b from torch's kaiming_uniform_(a=sqrt(5)) on PEFT's [r, in] weight."""
    import torch

    model = attach_lora(load_model(tiny_hf_dir), LoraConfig(r=16, target_modules=["q_proj", "o_proj"]), seed=3)
    for kernel, fan_in in (("wq", 128), ("wo", 128)):
        a = np.asarray(model.lora.a[kernel][...])
        peft_like = torch.empty(16, fan_in)
        torch.nn.init.kaiming_uniform_(peft_like, a=math.sqrt(5))
        bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / fan_in)
        assert np.abs(a).max() <= bound and peft_like.abs().max().item() <= bound
        assert abs(a.std() - peft_like.std().item()) / peft_like.std().item() < 0.1
        assert abs(a.mean()) < 0.1 * bound


def test_adapter_changes_output_and_merge_matches(tiny_hf_dir, base_logits):
    model = load_model(tiny_hf_dir)
    kernels = {k: np.asarray(getattr(model, k)[...]) for k in BASE_NAMES}
    attach_lora(model, LoraConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear"))
    randomize_b(model)
    unmerged = np.asarray(model(TOKENS))
    assert max_abs(unmerged, base_logits) > 1e-2
    merge(model)
    assert model.lora.merged and "lora" not in model.layer_params()
    assert max_abs(model(TOKENS), unmerged) <= 1e-5
    unmerge(model)
    for k in BASE_NAMES:
        assert max_abs(getattr(model, k)[...], kernels[k]) <= 1e-6
    assert max_abs(model(TOKENS), unmerged) <= 1e-5
    plain = merge_and_unload(model)
    assert getattr(plain, "lora", None) is None and not nnx.state(plain, LoRAParam)
    assert max_abs(plain(TOKENS), unmerged) <= 1e-5


def test_detach_restores_the_base(tiny_hf_dir, base_logits):
    model = attach_lora(load_model(tiny_hf_dir), LoraConfig(r=4, target_modules=["v_proj"]))
    randomize_b(model)
    assert max_abs(detach_lora(model)(TOKENS), base_logits) == 0.0


def test_dropout_only_in_train_mode(tiny_hf_dir):
    model = attach_lora(load_model(tiny_hf_dir), LoraConfig(r=4, dropout=0.5, target_modules=["q_proj", "up_proj"]))
    randomize_b(model, std=0.5)
    model.eval()
    first, again = np.asarray(model(TOKENS)), np.asarray(model(TOKENS))
    assert max_abs(first, again) == 0.0
    model.train()
    t1, t2 = np.asarray(model(TOKENS)), np.asarray(model(TOKENS))
    assert max_abs(t1, first) > 1e-4 and max_abs(t1, t2) > 1e-4  # a fresh mask on every call


# ---------------------------------------------------------------- which modules


def test_target_names_regex_and_layers():
    assert resolve_targets(LoraConfig(target_modules=["q_proj", "v_proj"]), 3) == {"wq": (0, 1, 2), "wv": (0, 1, 2)}
    assert resolve_targets(LoraConfig(target_modules=["mlp.down_proj"], layers_to_transform=[2, 0]), 3) == \
        {"w_down": (0, 2)}
    assert resolve_targets(LoraConfig(target_modules=["k_proj"], layers_to_transform=1), 3) == {"wk": (1,)}
    full = resolve_targets(LoraConfig(target_modules=["model.layers.1.self_attn.o_proj"]), 3)
    assert full == {"wo": (1,)}
    regex = resolve_targets(LoraConfig(target_modules=r".*\.(0|2)\.mlp\.(gate|up)_proj"), 3)
    assert regex == {"w_gate": (0, 2), "w_up": (0, 2)}
    assert len(resolve_targets(LoraConfig(target_modules="all-linear"), 2)) == 7


@pytest.mark.parametrize("config, message", [
    (LoraConfig(target_modules=["q_proj", "qproj"]), "'qproj' matches no module"),
    (LoraConfig(target_modules=["lm_head"]), "only the linear projections inside decoder layers"),
    (LoraConfig(target_modules=r".*\.attn\.q"), "matches no linear projection"),
    (LoraConfig(target_modules=r"(unclosed"), "invalid regex"),
    (LoraConfig(target_modules=r".*q_proj", layers_to_transform=[0]), "cannot be combined with a regex"),
    (LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]), "layer 5, the model has 2 layers"),
    (LoraConfig(r=0), "lora.r must be positive"),
    (LoraConfig(dropout=1.0), "lora.dropout"),
])
def test_bad_lora_config(config, message):
    with pytest.raises(LoraError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_targets(config, 2)


def test_rank_larger_than_layer(tiny_hf_dir):
    model = load_model(tiny_hf_dir)  # k_proj maps 128 -> 4 kv heads x 16 = 64 features
    with pytest.raises(LoraError, match=r"lora.r=65 is larger than the layer k_proj \(in 128 -> out 64"):
        attach_lora(model, LoraConfig(r=65, target_modules="all-linear"))
    assert getattr(model, "lora", None) is None  # nothing half-attached
    attach_lora(model, LoraConfig(r=64, target_modules=["k_proj"]))
    with pytest.raises(LoraError, match="already has a LoRA adapter"):
        attach_lora(model, LoraConfig(r=4))


def test_lora_applies_on_the_kv_cache_path(tiny_hf_dir):
    """Decoding with a cache (what `generate --lora` runs) sees the adapter too."""
    from rsdjax.model.llama import KVCache

    model = attach_lora(load_model(tiny_hf_dir), LoraConfig(r=4, target_modules=["k_proj", "o_proj", "gate_proj"]))
    randomize_b(model)
    full = np.asarray(model(TOKENS))
    positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1], dtype=jnp.int32), TOKENS.shape)
    prefill, cache = model(TOKENS[:, :16], positions[:, :16], cache=KVCache.zeros(model.cfg, 2, 32))
    step, _ = model(TOKENS[:, 16:], positions[:, 16:], cache=cache)
    assert max_abs(np.concatenate([prefill, step], axis=1), full) <= 1e-5
