"""`make demo`: the main job on the embedded default (tiny model, 8 virtual CPU devices).

Stages are added as the project grows; each prints what it shows.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def sharding_demo(workdir: Path) -> None:
    import numpy as np
    from flax import nnx

    from rsdjax.cli import main as cli
    from rsdjax.config import load_model_config
    from rsdjax.loading import load_model, save_model
    from rsdjax.model import Llama
    from rsdjax.parallel.mesh import make_mesh
    from rsdjax.parallel.sharding import create_sharded

    banner("Llama-3.1-70B over 4 CS-3 systems, checked from shapes alone")
    cli(["shard-report", "--model", "llama3.1-70b", "--hardware", "cs3x4", "model.param_dtype=bfloat16"])
    banner("tiny Llama on a virtual 8-device mesh (fsdp=2, tensor=4) vs one device")
    cfg = load_model_config("tiny")
    model = create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), make_mesh({"fsdp": 2, "tensor": 4}), "train")
    save_model(model, workdir / "tiny")
    single = load_model(workdir / "tiny")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    diff = float(np.abs(np.asarray(model(tokens)) - np.asarray(single(tokens))).max())
    print(f"wq sharding: {model.wq[...].sharding.spec}; max |logits(8 devices) - logits(1 device)| = {diff:.2e}")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        sharding_demo(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
