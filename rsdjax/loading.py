"""`load_model`: an HF Llama directory or an rsdjax checkpoint -> a sharded `Llama`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rsdjax.checkpoint import hf, native
from rsdjax.checkpoint.errors import CheckpointError
from rsdjax.config import ModelConfig, apply_overrides
from rsdjax.model.llama import Llama, resolve_dtype
from rsdjax.parallel.mesh import make_mesh
from rsdjax.parallel.rules import Rule
from rsdjax.parallel.sharding import state_shardings


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
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
    """Load an HF Llama directory (config.json + safetensors) or an rsdjax checkpoint onto `mesh`.

    Every tensor goes straight to its shard. `param_dtype`: None follows the dtype policy
    (float32 on CPU, bfloat16 elsewhere); 'keep' keeps the checkpoint's dtype; or a dtype name.
    """
    path = Path(path)
    cfg = read_model_config(path)
    if overrides:
        cfg = apply_overrides(cfg, list(overrides)).validate()
    mesh = mesh if mesh is not None else make_mesh({})
    if param_dtype == "keep":
        dtype = hf.file_dtype(path) if not native.is_native(path) else None
        cfg = apply_overrides(cfg, [f"param_dtype={jnp.dtype(dtype).name}"]) if dtype is not None else cfg
    elif param_dtype is not None:
        cfg = apply_overrides(cfg, [f"param_dtype={param_dtype}"])
    model = abstract_model(cfg)
    graphdef, abs_state = nnx.split(model)
    shardings = state_shardings(abs_state, mesh, rules)
    if native.is_native(path):
        target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                              nnx.to_pure_dict(abs_state), nnx.to_pure_dict(shardings))
        restored = native.restore_params(path, target)
        nnx.replace_by_pure_dict(abs_state, restored)
        return nnx.merge(graphdef, abs_state)
    arrays = hf.load_hf_state(path, cfg, nnx.to_pure_dict(abs_state), nnx.to_pure_dict(shardings),
                              param_dtype=resolve_dtype(cfg.param_dtype))
    nnx.replace_by_pure_dict(abs_state, arrays)
    return nnx.merge(graphdef, abs_state)


def save_model(model: Llama, path: str | Path) -> Path:
    """Write an rsdjax checkpoint (config + Orbax params)."""
    return native.save_params(Path(path), model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
