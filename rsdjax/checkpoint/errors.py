"""The error every checkpoint reader and writer raises (safetensors, HF, native, PEFT, training), and the
JSON read they share."""

import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the tensor."""


def read_json(path: Path, missing: str) -> dict:
    """The JSON object in `path`; CheckpointError(missing) when there is no such file, or naming the file
    when it is not valid JSON."""
    if not path.exists():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
