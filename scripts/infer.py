#!/usr/bin/env python
"""Batch generation from a script: `rsdjax generate --json` with the same flags and defaults.

    python scripts/infer.py --model checkpoints/tiny-hf --prompt "Hello" --prompt "日本の首都は" \
        --max-tokens 32 --temperature 0.7 --seed 0 --mesh data=2,tensor=4

Prints one JSON object: every completion's token ids, text (when the model has a tokenizer.json)
and timings. The Python API it runs: `rsdjax.infer.engine.load_engine` + `rsdjax.infer.generate.generate`
(see rsdjax/cli/generate.py); the flags are the CLI's own, so the two cannot drift apart.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from rsdjax.cli import main

    sys.exit(main(["generate", "--json", *sys.argv[1:]]))
