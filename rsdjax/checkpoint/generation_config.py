"""Generation defaults from a checkpoint: every EOS id and generation_config.json's sampling settings.

As vLLM does: EOS ids are the union of config.json's, generation_config.json's and the tokenizer's
(chat models end turns with a token only the tokenizer or generation config names), and a request
that leaves temperature / top_p / top_k / min_p / repetition_penalty unset gets the checkpoint's.
"""
from __future__ import annotations

import json
from pathlib import Path

from rsdjax.checkpoint.errors import CheckpointError

FILE = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read(model_path: str | Path) -> dict:
    """generation_config.json of a model directory ({} when there is none, e.g. a GGUF file)."""
    path = Path(model_path)
    file = path / FILE if path.is_dir() else None
    if file is None or not file.exists():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # refusing beats serving without the EOS ids it names (a chat model would never stop)
        raise CheckpointError(f"{file}: invalid JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def eos_ids(model_path: str | Path, cfg, tokenizer) -> list[int]:
    """EOS ids from the model config, generation_config.json and the tokenizer, in that order, deduplicated."""
    sources = [cfg.eos_token_id, read(model_path).get("eos_token_id")]
    if tokenizer is not None:
        sources.append(tokenizer.eos_ids)
    ids: list[int] = []
    for src in sources:
        for t in src if isinstance(src, list) else [src]:
            if t is not None and int(t) not in ids and 0 <= int(t) < cfg.logical_vocab_size:
                ids.append(int(t))
    return ids


def sampling_defaults(model_path: str | Path) -> dict:
    """The sampling settings generation_config.json names (only those), e.g. {'temperature': 0.6, 'top_p': 0.9}."""
    data = read(model_path)
    out = {}
    for key in SAMPLING_KEYS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CheckpointError(f"{Path(model_path) / FILE}: {key} must be a number, got {value!r}")
        out[key] = int(value) if key == "top_k" else float(value)
    return out
