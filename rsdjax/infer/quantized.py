"""int8 rsdjax checkpoints: `rsdjax convert --quantize int8` stores the serving weights as
`rsdjax.model.quant.quantize_serving` makes them, so loading one gives exactly the arrays that
quantizing the float model at load gives (no requantization, no float copy of any kernel).

Layout: a native checkpoint (`rsdjax_model.json` + Orbax `params/`) whose JSON also holds
`"quantization": {"mode": "int8", "groups": {...}}` and whose params are the serving weights, each
kernel's int8 values in `quant.INT8_ORDER` (a permutation of the model's layout): `embed`, `final_norm`, `lm_head` and `layers/<i>/<name>`,
each int8 kernel as `{"qvalue": int8, "scale": float32}`. A tied LM head is stored as its own int8
copy of the embedding. The engines are built on the shape-only model and get these weights.
"""
from __future__ import annotations

from pathlib import Path

from rsdjax.checkpoint import native
from rsdjax.checkpoint.errors import CheckpointError
from rsdjax.infer.forward import ServingWeights, serving_weights
from rsdjax.model.quant import DEFAULT_GROUPS, INT8, QArray, check_mode, make_qarray, quantize_serving

def _pack(a):
    return {"qvalue": a.qvalue, "scale": a.scale} if isinstance(a, QArray) else a


def _unpack(a):
    return make_qarray(a["qvalue"], a["scale"]) if isinstance(a, dict) and set(a) == {"qvalue", "scale"} else a


def to_tree(w: ServingWeights) -> dict:
    return {"embed": w.embed, "final_norm": w.final_norm, "lm_head": _pack(w.lm_head),
            "layers": {str(i): {k: _pack(v) for k, v in p.items()} for i, p in enumerate(w.layers)}}


def from_tree(tree: dict) -> ServingWeights:
    layers = [{k: _unpack(v) for k, v in tree["layers"][str(i)].items()} for i in range(len(tree["layers"]))]
    return ServingWeights(tree["embed"], tree["final_norm"], _unpack(tree["lm_head"]), layers, INT8)


def save_quantized(model, path, mode: str, mesh) -> Path:
    """Quantize `model` (float, no adapters) for serving and write it as an int8 checkpoint."""
    mode = check_mode(mode)
    if getattr(model, "lora", None) is not None:
        raise CheckpointError("--quantize: merge the LoRA adapter first (rsdjax lora merge); it is not stored")
    weights = quantize_serving(serving_weights(model, mesh), mode, DEFAULT_GROUPS)
    extra = {native.QUANTIZATION: {"mode": mode, "groups": dict(DEFAULT_GROUPS)}}
    return native.save_params(Path(path), model.cfg, to_tree(weights), extra=extra)


def load_quantized(path, mesh):
    """(the shape-only model, its int8 `ServingWeights` on `mesh`) of an int8 checkpoint."""
    from rsdjax.loading import abstract_model
    from rsdjax.parallel.sharding import sharded_abstract_model

    q = native.quantization_of(path)
    mode = check_mode(q.get("mode"))
    model = sharded_abstract_model(abstract_model(native.read_config(path)), mesh, "infer")
    target = quantize_serving(serving_weights(model, mesh), mode, q.get("groups", {}))  # shapes and shardings
    return model, from_tree(native.restore_params(Path(path), to_tree(target)))
