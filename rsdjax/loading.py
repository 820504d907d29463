"""`load_model`: an HF Llama directory, a llama.cpp GGUF file or an rsdjax checkpoint -> a sharded `Llama`."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rsdjax.checkpoint import gguf, gguf_device, hf, native
from rsdjax.checkpoint.errors import CheckpointError
from rsdjax.config import ModelConfig, apply_overrides
from rsdjax.model.llama import Llama, resolve_dtype
from rsdjax.parallel.mesh import make_mesh
from rsdjax.parallel.rules import Rule
from rsdjax.parallel.sharding import state_shardings


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return gguf.GGUFFile(path).config()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if native.is_native(path):
        return native.read_config(path)
    return hf.config_from_hf(path)


def abstract_model(cfg: ModelConfig, param_dtype=None) -> Llama:
    """The model with ShapeDtypeStructs for arrays: shapes and metadata, no memory."""
    return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def load_model(path: str | Path, mesh=None, rules: str | Sequence[Rule] = "infer",
               param_dtype: str | None = None, overrides: Sequence[str] = ()) -> Llama:
    """Load an HF Llama directory (config.json + safetensors), a GGUF file or an rsdjax checkpoint onto `mesh`.

    Every tensor goes straight to its shard. `param_dtype`: None follows the dtype policy
    (float32 on CPU, bfloat16 elsewhere); 'keep' keeps the checkpoint's dtype; or a dtype name.
    """
    path = Path(path)
    source = gguf.GGUFFile(path) if path.suffix.lower() == ".gguf" else None
    cfg = source.config() if source is not None else read_model_config(path)
    if overrides:
        cfg = apply_overrides(cfg, list(overrides)).validate()
    mesh = mesh if mesh is not None else make_mesh({})
    if param_dtype == "keep":  # a GGUF is dequantized to float32
        dtype = "float32" if source is not None else hf.file_dtype(path) if not native.is_native(path) else None
        cfg = apply_overrides(cfg, [f"param_dtype={jnp.dtype(dtype).name}"]) if dtype is not None else cfg
    elif param_dtype is not None:
        cfg = apply_overrides(cfg, [f"param_dtype={param_dtype}"])
    if source is not None or not native.is_native(path):
        cfg = pad_vocab_for_mesh(cfg, mesh)
    model = abstract_model(cfg)
    graphdef, abs_state = nnx.split(model)
    shardings = state_shardings(abs_state, mesh, rules)
    if source is None and native.is_native(path):
        if native.quantization_of(path) is not None:
            raise CheckpointError(f"{path}: an int8 checkpoint (rsdjax convert --quantize) holds no float weights: "
                                  "generate, serve, warmup and eval read it; for anything else use the float one")
        target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                              nnx.to_pure_dict(abs_state), nnx.to_pure_dict(shardings))
        restored = native.restore_params(path, target)
        nnx.replace_by_pure_dict(abs_state, restored)
        return nnx.merge(graphdef, abs_state)
    abstract, placed, dtype = nnx.to_pure_dict(abs_state), nnx.to_pure_dict(shardings), resolve_dtype(cfg.param_dtype)
    arrays = gguf_device.load_state(source, cfg, abstract, placed, dtype) if source is not None else None
    if arrays is None:  # safetensors, or a GGUF with a type only the host dequantizes
        arrays = hf.load_hf_state(path, cfg, abstract, placed, param_dtype=dtype,
                                  refs=None if source is None else source.tensor_refs(cfg))
    nnx.replace_by_pure_dict(abs_state, arrays)
    return nnx.merge(graphdef, abs_state)


def pad_vocab_for_mesh(cfg: ModelConfig, mesh) -> ModelConfig:
    """Embedding/LM-head rows padded up to a multiple of the `tensor` axis when it does not divide
    them (vLLM's fix for e.g. a 517-token vocabulary on tensor=2); the padding is masked and stripped."""
    tensor = int(mesh.shape.get("tensor", 1))
    if cfg.vocab_size % tensor == 0:
        return cfg
    real = cfg.logical_vocab_size
    return dataclasses.replace(cfg, vocab_size=-(-cfg.vocab_size // tensor) * tensor, real_vocab_size=real).validate()


def save_model(model: Llama, path: str | Path) -> Path:
    """Write an rsdjax checkpoint (config + Orbax params)."""
    return native.save_params(Path(path), model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
