#!/usr/bin/env python
"""Continual pre-training, like TEDLLM: `python scripts/train_cpt.py CONFIG [key=value ...]`.

The same as `rsdjax train`; run the same command again to resume. Examples:
    python scripts/train_cpt.py configs/train/cpt-demo.yaml
    python scripts/train_cpt.py cpt-demo steps=50 --mesh fsdp=8
    python scripts/train_cpt.py cpt-tedllm-8b --dry-run --hardware h100-node
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rsdjax.cli import main  # noqa: E402


def run_demo(overrides: list[str] = ()) -> int:
    """What `make demo` runs first: the tiny CPT demo on 8 virtual CPU devices (a few minutes)."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    return main(["train", "cpt-demo", *overrides])


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
