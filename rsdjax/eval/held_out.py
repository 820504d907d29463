"""Held-out evaluation inside a training run (`eval:` in train and LoRA configs).

`HeldOut(cfg.eval, ...)` reads and tokenizes the held-out sources once, builds one `EvalStep` for
the model's structure (its shardings are the training shardings, so the live arrays go in as they
are), and `HeldOut.run(state)` returns {source: metrics}. It reads the model state only: no
optimizer, RNG or data-position input, so a run with evaluation takes the same steps, bit for bit,
as one without.
"""
from __future__ import annotations

import dataclasses

from rsdjax.data.sources import DataError, expand_paths
from rsdjax.eval.data import document_prefix
from rsdjax.eval.metrics import evaluate_rows
from rsdjax.eval.run import Source, source_rows
from rsdjax.eval.step import EvalStep


def hold_out_files(sources, fraction: float):
    """(training sources without their held-out files, held-out sources of the same names).

    Every k-th file of a source is held out (k = round(1 / fraction), the first held-out file being
    the k-th), so the split is deterministic and spread over the source; a source needs at least
    two files. Held-out files never reach the token store, so they are never trained on.
    """
    from rsdjax.train.config import EvalSourceConfig

    train, held = [], []
    for src in sources:
        files = expand_paths(src.paths)
        k = max(2, round(1 / fraction))
        out = [f for i, f in enumerate(files, 1) if i % k == 0] or files[-1:]
        keep = [f for f in files if f not in out]
        if not keep:
            raise DataError(f"data source '{src.name}': eval.holdout={fraction} needs at least 2 files "
                            f"(it has {len(files)}); give held-out files in eval.sources instead")
        train.append(dataclasses.replace(src, paths=[str(f) for f in keep]))
        held.append(EvalSourceConfig(src.name, [str(f) for f in out]))
    return train, held


class HeldOut:
    def __init__(self, cfg, tokenizer, model, mesh, *, seq_len: int, batch_size: int, total_steps: int,
                 template: str = "llama3", extra_sources=()):
        """`cfg`: an EvalConfig; `model`: the model's structure (abstract is enough; set to eval mode);
        `extra_sources`: more EvalSourceConfigs (the files `hold_out_files` took from training)."""
        self.cfg, self.total = cfg, total_steps
        self.batch_size = batch_size
        prefix = document_prefix(tokenizer, model.cfg)
        named = {s.name: s for s in [*extra_sources, *cfg.sources]}  # explicit files win over a held-out share
        self.sources = [(s.name, *source_rows(Source(s.name, list(s.paths)), tokenizer, seq_len, prefix, template)[:2])
                        for s in named.values()]
        self.step = EvalStep(model, mesh, batch_size=batch_size)

    def due(self, step: int, fresh_start: bool = False) -> bool:
        """Evaluate after update `step` (0 = before the first)?"""
        if step == 0:
            return fresh_start and self.cfg.at_start
        return (self.cfg.at_end and step == self.total) or bool(self.cfg.every and step % self.cfg.every == 0)

    def run(self, state: dict) -> dict[str, dict]:
        """{source: {loss, perplexity, bits_per_byte, chars_per_token, ...}} for the model state `state`."""
        out = {}
        for name, rows, stats in self.sources:
            out[name] = evaluate_rows(self.step, state, name, rows, stats, self.batch_size).to_json()
        return out
