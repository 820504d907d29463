"""Check a (full-size) train config on a laptop: shardings, bytes per device, AOT lowering of the step."""
from __future__ import annotations

from rsdjax.hardware import format_mesh, load_hardware
from rsdjax.parallel.mesh import mesh_shape_of
from rsdjax.parallel.sharding import device_bytes
from rsdjax.train.config import TrainConfig


def dry_run(cfg: TrainConfig, mesh, log=print) -> dict:
    from rsdjax.loading import abstract_model
    from rsdjax.train.loop import Stages
    from rsdjax.train.step import check_batch

    check_batch(cfg.batch_size, cfg.grad_accum, mesh)
    model_cfg = cfg.model.validate()
    # no tokenizers here: an embeddings stage on new rows only lowers the same program from row 0
    stages = Stages(cfg, abstract_model(model_cfg), mesh, 0 if cfg.embedding_rows == "new" else None)
    hw = load_hardware(cfg.hardware or "cpu")
    report = {"model": model_cfg.name, "params": model_cfg.num_params(), "mesh": mesh_shape_of(mesh), "stages": {}}
    log(f"{cfg.name}: model {model_cfg.name} ({model_cfg.num_params() / 1e9:.2f} B parameters, vocab "
        f"{model_cfg.vocab_size}), mesh {format_mesh(mesh_shape_of(mesh))}, batch {cfg.batch_size} x "
        f"{cfg.data.seq_len} (grad_accum {cfg.grad_accum}), hardware {hw.name}")
    for name, start, end in cfg.stages:
        ts = stages.step_fn(name)
        params = device_bytes(ts.abstract_state.params)
        frozen = device_bytes(ts.abstract_frozen)
        opt = device_bytes(ts.abstract_state.opt_state)
        ts.lower(cfg.batch_size, cfg.data.seq_len)
        total = params + frozen + opt
        report["stages"][name] = {"trainable_bytes": params, "frozen_bytes": frozen, "optimizer_bytes": opt}
        log(f"stage '{name}' (steps {start}-{end}): per device {params / 1e9:.2f} GB trainable + {frozen / 1e9:.2f} GB "
            f"frozen + {opt / 1e9:.2f} GB optimizer = {total / 1e9:.2f} GB of {hw.device.usable_bytes / 1e9:.1f} GB "
            f"({'fits' if total <= hw.device.usable_bytes else 'DOES NOT FIT'} before activations); step lowered OK")
    return report
