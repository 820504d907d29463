"""Typed configs: small dataclasses, loaded from YAML, changed by dotted `key=value` overrides.

Every entry point owns a small config (Levanter style). This module holds the shared
machinery plus the model config, which every entry point embeds.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and why."""


@dataclasses.dataclass
class RopeScaling:
    """Llama-3.1 frequency scaling (HF `rope_scaling` with rope_type 'llama3')."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclasses.dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 32000  # rows of the embedding and LM head
    # set when rows were padded on load so the mesh divides them (as vLLM pads): the checkpoint's own
    # vocabulary; ids from here to vocab_size get -inf logits and exports strip them
    real_vocab_size: int | None = None
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    param_dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on accelerators
    dtype: str = "auto"  # compute dtype, same policy
    remat: bool = False  # recompute each layer's activations in the backward pass
    # false: the layer loop is unrolled (MaxText's scan_layers). A scan writes each layer's residuals
    # into layer-stacked buffers, zero-filled every step (XLA:CPU, bench_train: ~3-5% of a step);
    # unrolled, compiles take longer (8 layers: 4.3 -> 5.8 s)
    scan_layers: bool = True
    # How the layer stack runs on a mesh (rsdjax/parallel/layer_stack.py); execution only, not weights.
    pipeline: bool = True  # stage > 1: run layer groups as a microbatched pipeline; false: one scan
    pipeline_microbatches: int = 0  # 0: chosen from the batch (<= 4 x stages); n: exactly n
    tensor_parallel: str = "compiler"  # compiler: XLA partitions by sharding; shard_map: explicit psums

    @property
    def logical_vocab_size(self) -> int:
        """Token ids the model knows (vocab_size without load-time padding)."""
        return self.real_vocab_size or self.vocab_size

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> "ModelConfig":
        where = f"model '{self.name}'"
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{where}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{where}: hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}; set head_dim")
        if self.real_vocab_size is not None and not 0 < self.real_vocab_size <= self.vocab_size:
            raise ConfigError(f"{where}: real_vocab_size={self.real_vocab_size} must be in [1, vocab_size={self.vocab_size}]")
        if self.pipeline_microbatches < 0:
            raise ConfigError(f"{where}: pipeline_microbatches must be >= 0, got {self.pipeline_microbatches}")
        if self.tensor_parallel not in ("compiler", "shard_map"):
            raise ConfigError(f"{where}: tensor_parallel must be 'compiler' or 'shard_map', got '{self.tensor_parallel}'")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"{where}: head_dim={self.resolved_head_dim} must be even for RoPE")
        return self

    def num_params(self) -> int:
        e, m, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        d, h, kv = self.resolved_head_dim, self.num_heads, self.num_kv_heads
        per_layer = e * d * (2 * h + 2 * kv) + 3 * e * m + 2 * e
        return l * per_layer + v * e * (1 if self.tie_word_embeddings else 2) + e


# ---------------------------------------------------------------- generic machinery


# a decimal number as YAML 1.2 writes it; not "nan" or "inf", which float() would also take
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the dataclass field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _DECIMAL.fullmatch(value):  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are errors, not silently ignored."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise unknown_key(f"{prefix}{unknown[0]}", [prefix + n for n in names])
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a dataclass config accepts (nested dataclasses expanded), e.g. 'optim.lr'."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)  # X | None: X's keys (a list is a leaf)
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)] if optional else [hint]
        if inner and dataclasses.is_dataclass(inner[0]):
            keys += config_keys(inner[0], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def unknown_key(key: str, valid) -> ConfigError:
    """'unknown config key ...' naming the nearest valid key (or, when none is close, the valid ones)."""
    valid = sorted(set(valid))
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:  # a right leaf under a wrong (or missing) section: compare the last part
        leaf = key.rsplit(".", 1)[-1]
        near = [v for v in valid if v.rsplit(".", 1)[-1] == leaf][:1] or difflib.get_close_matches(
            leaf, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'?" if near else "known: " + ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
    return ConfigError(f"unknown config key '{key}' ({hint})")


def check_keys(overrides: list[str], valid, where: str = "") -> None:
    """Raise ConfigError for the first `key=value` whose key is not one of `valid`, naming the nearest."""
    valid = set(valid)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where}override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        if key not in valid and not any(key.startswith(v + ".") for v in valid):
            raise ConfigError(f"{where}{unknown_key(key, valid)}")


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """Return a copy of dataclass `obj` with `a.b=value` overrides applied (values parsed as YAML)."""
    data = to_dict(obj)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': value is not valid YAML (quote it: {key}='\"...\"')") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise unknown_key(key, config_keys(type(obj)))
            if node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise unknown_key(key, config_keys(type(obj)))
        node[parts[-1]] = value
    return from_dict(type(obj), data)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def preset_path(kind: str, name_or_path: str) -> Path:
    """A preset name (`llama3-8b`) under configs/<kind>/, or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = CONFIG_ROOT / kind / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(q.stem for q in (CONFIG_ROOT / kind).glob("*.yaml"))
        raise ConfigError(f"unknown {kind} preset '{name_or_path}' (known: {', '.join(known)})")
    return candidate


def load_model_config(name_or_path: str, overrides: list[str] = ()) -> ModelConfig:
    path = preset_path("models", name_or_path)
    data = load_yaml(path)
    data.pop("source", None)  # provenance note kept in the YAML only
    try:
        cfg = from_dict(ModelConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, list(overrides)).validate()
