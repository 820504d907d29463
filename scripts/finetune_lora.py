#!/usr/bin/env python
"""LoRA fine-tuning: `python scripts/finetune_lora.py lora-qa-demo base=DIR [key=value ...] [--mesh ...]`.

The same as `rsdjax finetune ...`; see docs/lora.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rsdjax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
