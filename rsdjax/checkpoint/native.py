"""rsdjax model checkpoints: `rsdjax_model.json` (the model config) + Orbax `params/`.

Orbax restores each array directly into its target sharding, so a checkpoint written on one mesh
loads on any other.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rsdjax.config import ConfigError, ModelConfig, from_dict, to_dict
from rsdjax.checkpoint.durable import publish_dir
from rsdjax.checkpoint.errors import CheckpointError

MODEL_FILE = "rsdjax_model.json"
FORMAT_VERSION = 1
QUANTIZATION = "quantization"  # the JSON entry of an int8 checkpoint (rsdjax/infer/quantized.py)


def is_native(directory: Path) -> bool:
    return (Path(directory) / MODEL_FILE).exists()


def read_config(directory: Path) -> ModelConfig:
    path = Path(directory) / MODEL_FILE
    try:
        data = json.loads(path.read_text())
        return from_dict(ModelConfig, data["model"]).validate()
    except (json.JSONDecodeError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{path}: not a valid rsdjax model file ({e})") from None


def quantization_of(directory: Path) -> dict | None:
    """`{"mode": ..., "groups": ...}` of a quantized checkpoint; None for a float one (or not native)."""
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get(QUANTIZATION)
    except json.JSONDecodeError:
        return None  # read_config names the broken file


def save_params(directory: Path, cfg: ModelConfig, params_pure: dict, extra: dict | None = None) -> Path:
    """Write config + params atomically: into DIR.tmp, then rename (an interrupted save leaves DIR intact)."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: exists and is not empty; refusing to overwrite")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _orbax().StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", params_pure)
        ckptr.wait_until_finished()
    (tmp / MODEL_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "model": to_dict(cfg), **(extra or {})},
                                             indent=2))
    publish_dir(tmp, directory)
    return directory


def restore_params(directory: Path, abstract_pure: dict) -> dict:
    """Restore into `abstract_pure` (ShapeDtypeStructs with shardings); shapes must match."""
    directory = Path(directory).absolute()
    with _orbax().StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(directory / "params", abstract_pure)
        except (ValueError, KeyError, FileNotFoundError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{directory}/params: cannot restore ({msg})") from None


def _orbax():
    """Orbax, imported when a checkpoint is read or written: 0.2 s that loading a GGUF or HF model (and
    every `rsdjax` command's start, through rsdjax.loading) does not need."""
    import orbax.checkpoint as ocp

    return ocp
