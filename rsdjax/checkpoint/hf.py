"""HF Llama directories (config.json + safetensors) in and out.

Loading never materialises the whole model on one device: each parameter is a
`jax.make_array_from_callback` whose callback cuts the device's shard from memory-mapped files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from rsdjax.config import ModelConfig, RopeScaling
from rsdjax.checkpoint.durable import publish_dir
from rsdjax.checkpoint.errors import CheckpointError, read_json
from rsdjax.checkpoint.safetensors_io import ShardedWriter, TensorRef, index_directory

# our stacked name -> (HF name inside layer i, HF tensor -> our per-layer array, our per-layer -> HF)
LAYER_TENSORS = {
    "wq": ("self_attn.q_proj.weight", "heads_in", "heads_in"),
    "wk": ("self_attn.k_proj.weight", "kv_in", "kv_in"),
    "wv": ("self_attn.v_proj.weight", "kv_in", "kv_in"),
    "wo": ("self_attn.o_proj.weight", "heads_out", "heads_out"),
    "w_gate": ("mlp.gate_proj.weight", "t", "t"),
    "w_up": ("mlp.up_proj.weight", "t", "t"),
    "w_down": ("mlp.down_proj.weight", "t", "t"),
    "attn_norm": ("input_layernorm.weight", None, None),
    "mlp_norm": ("post_attention_layernorm.weight", None, None),
}
GLOBAL_TENSORS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


# ---------------------------------------------------------------- config.json


def config_from_hf(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    hf = read_json(path, f"{directory}: no config.json (not an HF model directory)")
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type is '{hf.get('model_type')}', rsdjax loads only 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act '{hf['hidden_act']}' is not supported (only silu)")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5
    legacy = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type") == "llama3" else legacy if legacy.get("rope_type", legacy.get("type")) == "llama3" else None
    if (rope.get("rope_type") not in (None, "default", "llama3")) or (legacy and scaling is None):
        raise CheckpointError(f"{path}: rope scaling {rope or legacy} is not supported (only default and llama3)")
    heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            name=Path(directory).name,
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") if hf.get("head_dim") not in (None, hf["hidden_size"] // heads) else None,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
            rope_scaling=None if scaling is None else RopeScaling(
                factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"])),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        ).validate()
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy_scaling = None
    if cfg.rope_scaling:
        rs = cfg.rope_scaling
        legacy_scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                          "high_freq_factor": rs.high_freq_factor,
                          "original_max_position_embeddings": rs.original_max_position_embeddings}
        rope = {**legacy_scaling, "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.logical_vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": legacy_scaling, "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype, "dtype": dtype,
    }


# ---------------------------------------------------------------- tensor layout


def from_hf(kind, t, cfg: ModelConfig):
    """An HF tensor (numpy or jax, any leading axes: a stack of layers) in our layout."""
    e, d = cfg.hidden_size, cfg.resolved_head_dim
    lead = t.shape[:-2]
    if kind == "heads_in" or kind == "kv_in":  # [heads*D, E] -> [E, heads, D]
        return t.swapaxes(-1, -2).reshape(*lead, e, -1, d)
    if kind == "heads_out":  # [E, H*D] -> [H, D, E]
        return t.swapaxes(-1, -2).reshape(*lead, -1, d, e)
    if kind == "t":
        return t.swapaxes(-1, -2)
    return t


def _to_hf(kind, a: np.ndarray) -> np.ndarray:
    if kind in ("heads_in", "kv_in"):  # [E, heads, D] -> [heads*D, E]
        return a.reshape(a.shape[0], -1).T
    if kind == "heads_out":  # [H, D, E] -> [E, H*D]
        return a.reshape(-1, a.shape[-1]).T
    if kind == "t":
        return a.T
    return a


def _hf_shape(kind, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_to_hf(kind, np.empty(shape, np.int8)).shape)


class Source:
    """Where each of our parameters lives in the HF files, with shape checks up front."""

    def __init__(self, refs: dict[str, TensorRef], cfg: ModelConfig, abstract_state, directory: Path):
        self.refs, self.cfg, self.dir = refs, cfg, directory
        for name, var in abstract_state.items():
            for key, kind, shape in self.expected(name, tuple(var.shape)):
                ref = refs.get(key)
                if ref is None:
                    raise CheckpointError(f"{directory}: tensor '{key}' is missing")
                if ref.shape != shape:
                    raise CheckpointError(
                        f"{ref.file}: tensor '{key}' has shape {list(ref.shape)}, expected {list(shape)} for this config")
                if ref.dtype.kind != "f" and ref.dtype.name != "bfloat16":  # ml_dtypes' bfloat16 is kind "V"
                    raise CheckpointError(f"{ref.file}: tensor '{key}' has dtype {ref.dtype}, but Llama weights "
                                          "are floating point (F32, F16 or BF16)")

    def expected(self, name, shape):
        if name in ("embed", "lm_head"):  # the file has the real vocabulary; padding rows are added on read
            shape = _unpadded(name, shape, self.cfg)
        if name in LAYER_TENSORS:
            hf_name, kind, _ = LAYER_TENSORS[name]
            return [(f"model.layers.{i}.{hf_name}", kind, _hf_shape(kind, shape[1:])) for i in range(shape[0])]
        kind = "t" if name == "lm_head" else None
        return [(GLOBAL_TENSORS[name], kind, _hf_shape(kind, shape))]

    def read(self, name: str, index: tuple[slice, ...], shape) -> np.ndarray:
        if name in LAYER_TENSORS:
            hf_name, kind, _ = LAYER_TENSORS[name]
            layers = range(*index[0].indices(shape[0]))
            parts = [from_hf(kind, self.refs[f"model.layers.{i}.{hf_name}"].load(), self.cfg)[index[1:]] for i in layers]
            return np.stack(parts)
        kind = "t" if name == "lm_head" else None
        full = from_hf(kind, self.refs[GLOBAL_TENSORS[name]].load(), self.cfg)
        if name in ("embed", "lm_head") and tuple(full.shape) != tuple(shape):
            axis = 0 if name == "embed" else 1  # zero rows: their logits are masked to -inf anyway
            pad = [(0, 0), (0, 0)]
            pad[axis] = (0, shape[axis] - full.shape[axis])
            full = np.pad(np.asarray(full), pad)
        return full[index]


def load_hf_state(directory: Path, cfg: ModelConfig, abstract_state, shardings, param_dtype=None, refs=None):
    """Arrays for every variable of `abstract_state`, each created shard by shard on its devices.
    `refs`: tensors by HF name (default: the directory's safetensors; a GGUF passes its own)."""
    source = Source(index_directory(directory) if refs is None else refs, cfg, abstract_state, Path(directory))

    def make(name, var, sharding):
        dtype = param_dtype or var.dtype
        return jax.make_array_from_callback(
            tuple(var.shape), sharding,
            lambda idx: np.asarray(source.read(name, _full(idx, var.shape), var.shape), dtype=dtype))

    return {name: make(name, var, shardings[name]) for name, var in abstract_state.items()}


def _unpadded(name: str, shape, cfg: ModelConfig) -> tuple[int, ...]:
    shape = list(shape)
    shape[0 if name == "embed" else 1] = cfg.logical_vocab_size
    return tuple(shape)


def _full(idx, shape):
    return tuple(idx) + (slice(None),) * (len(shape) - len(idx))


def file_dtype(directory: Path) -> np.dtype:
    refs = index_directory(directory)
    return refs["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in refs else next(iter(refs.values())).dtype


# ---------------------------------------------------------------- export


def save_hf(model, directory: Path, max_shard_bytes: int = 2 << 30, tokenizer_dir: Path | None = None,
            tokenizer=None) -> Path:
    """Write `model` as an HF Llama directory. Writes into DIR.tmp and renames, so DIR is never half-written.
    The tokenizer: files copied from `tokenizer_dir`, or a `Tokenizer` saved (`tokenizer`)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: exists and is not empty; refusing to overwrite")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.cfg
    state = nnx.state(model, nnx.Param)
    host = lambda a: np.asarray(jax.device_get(a))  # noqa: E731  (gathers one slice at a time)
    writer = ShardedWriter(tmp, max_shard_bytes)
    dtype = host(state["embed"][...][:1]).dtype
    real = cfg.logical_vocab_size  # rows padded for a mesh on load are not part of the model
    writer.add(GLOBAL_TENSORS["embed"], host(state["embed"][...][:real]))
    for i in range(cfg.num_layers):
        for name, (hf_name, kind, _) in LAYER_TENSORS.items():
            writer.add(f"model.layers.{i}.{hf_name}", _to_hf(kind, host(state[name][...][i])))
    writer.add(GLOBAL_TENSORS["final_norm"], host(state["final_norm"][...]))
    if not cfg.tie_word_embeddings:
        writer.add(GLOBAL_TENSORS["lm_head"], host(state["lm_head"][...][:, :real]).T)
    writer.close()
    (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, str(np.dtype(dtype).name)), indent=2))
    if tokenizer is not None:
        tokenizer.save(tmp)
    elif tokenizer_dir is not None:
        for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (Path(tokenizer_dir) / fname).exists():
                shutil.copy(Path(tokenizer_dir) / fname, tmp / fname)
    publish_dir(tmp, directory)
    return directory
