"""Shared by tests/test_infer_*.py: a tiny HF Llama with confident predictions, and engines over it.

Random Llamas at the usual init scale (std 0.02) have nearly flat next-token distributions, so an
argmax comparison with HF would be a coin toss on float noise. `initializer_range=0.3` makes the
logits spread by a few units: top-1 margins are orders of magnitude above f32 error (the HF test
asserts that margin, so the comparison stays meaningful).

Everything is built once per test process and shared between modules; an engine is handed out
with every slot free.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from conftest import make_hf_llama

CONFIDENT_INIT = 0.3
_dirs: dict[str, Path] = {}
_engines: dict[tuple, object] = {}


def confident_hf_dir(tmp_path_factory) -> Path:
    if "model" not in _dirs:
        path = tmp_path_factory.mktemp("confident_hf")
        make_hf_llama(path, seed=1, initializer_range=CONFIDENT_INIT)
        _dirs["model"] = path
    return _dirs["model"]


def confident_dir_with_tokenizer(tmp_path_factory, tokenizer_dir: Path) -> Path:
    """The same model with the tiny byte-level tokenizer (vocab 512) next to it."""
    if "with_tokenizer" not in _dirs:
        path = tmp_path_factory.mktemp("confident_hf_tok")
        src = confident_hf_dir(tmp_path_factory)
        for f in src.iterdir():
            shutil.copy(f, path / f.name)
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, path / f.name)
        _dirs["with_tokenizer"] = path
    return _dirs["with_tokenizer"]


def shared_engine(path: Path, max_slots: int = 4, max_context: int = 128, mesh: str | None = None,
                  kind: str = "slots", **paged_options):
    """(engine, tokenizer) for `path`, loaded once per (path, slots, context, mesh, kind, options); all
    slots free. `kind="slots"`: the contiguous SlotEngine (the paged engine's reference)."""
    from rsdjax.infer.engine import load_engine
    from rsdjax.parallel.mesh import make_mesh, resolve_mesh_shape

    key = (str(path), max_slots, max_context, mesh, kind, tuple(sorted(paged_options.items())))
    if key not in _engines:
        m = make_mesh(resolve_mesh_shape(mesh)) if mesh else None
        _engines[key] = load_engine(path, mesh=m, max_slots=max_slots, max_context=max_context, kind=kind,
                                    **paged_options)
    engine, tokenizer = _engines[key]
    for slot in range(engine.max_slots):
        engine.free(slot)
    return engine, tokenizer


def compiled_shapes(engine) -> dict:
    """{step name: shapes compiled so far} for either engine (`_steps` holds its jitted steps)."""
    steps = engine._steps
    return {f.name: getattr(steps, f.name)._cache_size() for f in dataclasses.fields(steps)
            if hasattr(getattr(steps, f.name), "_cache_size")}


def hf_model(path: Path):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run the full length, like ignore_eos
    model.generation_config.pad_token_id = 0
    return model
