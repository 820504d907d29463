"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores, for each adapted `nn.Linear` of `LlamaForCausalLM`,
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]
Our factors are stacked over layers with the kernel's own dims: A [L, in..., r], B [L, r, out...].
The features flatten in the same (heads, head_dim) order as HF's weights (see `checkpoint/hf.py`),
so converting is a reshape and a transpose per layer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from rsdjax.checkpoint.durable import publish_file
from rsdjax.checkpoint.errors import CheckpointError, read_json
from rsdjax.checkpoint.safetensors_io import read_header
from rsdjax.model.lora import (SHORT_NAMES, IN_DIMS, LoraConfig, LoraError, attach_lora, module_name,
                               resolve_targets)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIXES = ("base_model.model.", "base_model.model.model.")  # CausalLM adapters use the second form
_UNSUPPORTED = {  # PEFT options whose adapters we would silently get wrong: refuse them by name
    "use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "lora_bias": False,
    "trainable_token_indices": None, "target_parameters": None, "exclude_modules": None,
}


def tensor_key(kernel: str, layer: int, which: str) -> str:
    return f"base_model.model.{module_name(kernel, layer)}.lora_{which}.weight"


# ---------------------------------------------------------------- export


def save_adapter(model, directory: str | Path, base_model_name_or_path: str | None = None, write: bool = True) -> Path:
    """Write `model.lora` as a PEFT adapter into `directory` (created if needed).

    Refuses to overwrite an existing adapter; each file is written under a temporary name and
    renamed, so an interrupted save never leaves a half-written adapter. With several processes every
    process calls it (factors split over processes are gathered) and one writes (`write`).
    """
    lora = getattr(model, "lora", None)
    if lora is None:
        raise LoraError("model has no LoRA adapter to save")
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if (directory / name).exists():
            raise CheckpointError(f"{directory / name}: exists; refusing to overwrite an adapter")
    tensors = {}
    for kernel, layers in lora.layers.items():
        a, b = host(lora.a[kernel][...]), host(lora.b[kernel][...])
        r = a.shape[-1]
        for i in layers:
            tensors[tensor_key(kernel, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[tensor_key(kernel, i, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    config = adapter_config(lora.config, lora.layers, model.cfg.num_layers, base_model_name_or_path)
    if not write:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    _atomic(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory


def host(x) -> np.ndarray:
    """A (possibly multi-process) array as float32 numpy; a collective where it spans processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)


def adapter_config(config: LoraConfig, layers: dict[str, tuple[int, ...]], num_layers: int,
                   base_model_name_or_path: str | None = None) -> dict:
    """PEFT's adapter_config.json. Targets are written as PEFT resolves them: short names plus
    `layers_to_transform` when all targets share one set of layers, else the full module names."""
    layer_sets = set(layers.values())
    if len(layer_sets) == 1:
        (shared,) = layer_sets
        targets = sorted(SHORT_NAMES[k] for k in layers)
        layers_to_transform = None if shared == tuple(range(num_layers)) else list(shared)
    else:
        targets = sorted(module_name(k, i) for k, ls in layers.items() for i in ls)
        layers_to_transform = None
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": config.r, "lora_alpha": alpha,
        "lora_dropout": config.dropout, "use_rslora": config.use_rslora, "target_modules": targets,
        "layers_to_transform": layers_to_transform, "layers_pattern": None, "init_lora_weights": True,
        "auto_mapping": None, "megatron_config": None, "megatron_core": "megatron.core", "loftq_config": {},
        **_UNSUPPORTED,
    }


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    publish_file(tmp, path)


# ---------------------------------------------------------------- import


def read_adapter_config(directory: str | Path) -> LoraConfig:
    path = Path(directory) / CONFIG_FILE
    data = read_json(path, f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {data.get('peft_type')!r}, rsdjax loads only LORA")
    for key, default in _UNSUPPORTED.items():
        if data.get(key, default) not in (default, None, [], {}, False):
            raise CheckpointError(f"{path}: {key}={data[key]!r} is not supported by rsdjax LoRA")
    if data.get("layers_pattern"):
        raise CheckpointError(f"{path}: layers_pattern={data['layers_pattern']!r} is not supported")
    try:
        return LoraConfig(r=int(data["r"]), alpha=float(data.get("lora_alpha", 8)),
                          dropout=float(data.get("lora_dropout", 0.0)), target_modules=data["target_modules"],
                          use_rslora=bool(data.get("use_rslora", False)),
                          layers_to_transform=data.get("layers_to_transform")).validate()
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None
    except LoraError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_adapter_weights(directory: str | Path, config: LoraConfig, model_cfg) -> tuple[dict, dict]:
    """({kernel: (A [L, in..., r], B [L, r, out...])}, {kernel: layers}) from the safetensors file,
    checked against the base model's shapes; rows of layers the adapter does not cover are zero."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.exists():
        extra = " (adapter_model.bin is not read: re-save it with safe_serialization=True)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}{extra}")
    refs = {_strip(k): v for k, v in read_header(path).items()}
    try:
        layers = resolve_targets(config, model_cfg.num_layers)
    except LoraError as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from None
    shapes = _kernel_shapes(model_cfg)
    weights, used = {}, set()
    r = config.r
    for kernel, adapted in layers.items():
        in_shape, out_shape = shapes[kernel]
        a = np.zeros((model_cfg.num_layers, *in_shape, r), np.float32)
        b = np.zeros((model_cfg.num_layers, r, *out_shape), np.float32)
        for i in adapted:
            for which, want in (("A", (r, math.prod(in_shape))), ("B", (math.prod(out_shape), r))):
                key = _strip(tensor_key(kernel, i, which))
                ref = refs.get(key)
                if ref is None:
                    raise CheckpointError(f"{path}: tensor '{tensor_key(kernel, i, which)}' is missing")
                if ref.shape != want:
                    raise CheckpointError(
                        f"{path}: tensor '{tensor_key(kernel, i, which)}' has shape {list(ref.shape)}, expected "
                        f"{list(want)} for this base model (adapter made for a different base?)")
                used.add(key)
                t = np.asarray(ref.load(), np.float32)
                if which == "A":
                    a[i] = t.T.reshape(*in_shape, r)
                else:
                    b[i] = t.T.reshape(r, *out_shape)
        weights[kernel] = (a, b)
    unused = sorted(set(refs) - used)
    if unused:
        raise CheckpointError(f"{path}: tensor 'base_model.model.{unused[0]}' matches no adapted module of this "
                              f"base model ({len(unused)} such tensors; adapter made for a different base?)")
    return weights, layers


def _strip(key: str) -> str:
    """Key without the PEFT prefix, so both `base_model.model.model.layers` forms compare equal."""
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if key.startswith(prefix + "model.layers.") or key.startswith(prefix + "layers."):
            rest = key[len(prefix):]
            return rest if rest.startswith("model.") else "model." + rest
    return key


def _kernel_shapes(cfg) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    e, m, h, kv, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    per_layer = {"wq": (e, h, d), "wk": (e, kv, d), "wv": (e, kv, d), "wo": (h, d, e),
                 "w_gate": (e, m), "w_up": (e, m), "w_down": (m, e)}
    return {k: (s[:IN_DIMS.get(k, 1)], s[IN_DIMS.get(k, 1):]) for k, s in per_layer.items()}


def load_adapter(model, directory: str | Path, seed: int = 0):
    """Attach the PEFT adapter in `directory` to `model` (sharded like the base kernels); return model."""
    config = read_adapter_config(directory)
    weights, _ = read_adapter_weights(directory, config, model.cfg)
    try:
        return attach_lora(model, config, seed=seed, weights=weights)
    except LoraError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def apply_adapter(model, adapter_dir):
    """Load a PEFT LoRA adapter directory onto a loaded model and return it (LoRA attached, unmerged)."""
    return load_adapter(model, adapter_dir)
