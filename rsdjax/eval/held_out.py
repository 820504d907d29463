"""Held-out evaluation inside a training run (`eval:` in train and LoRA configs).

`HeldOut(cfg.eval, ...)` reads and tokenizes the held-out sources once, builds one `EvalStep` for
the model's structure (its shardings are the training shardings, so the live arrays go in as they
are), and `HeldOut.run(state)` returns {source: metrics}. It reads the model state only: no
optimizer, RNG or data-position input, so a run with evaluation takes the same steps, bit for bit,
as one without.
"""
from __future__ import annotations

from rsdjax.eval.data import document_prefix
from rsdjax.eval.metrics import evaluate_rows
from rsdjax.eval.run import Source, source_rows
from rsdjax.eval.step import EvalStep


class HeldOut:
    def __init__(self, cfg, tokenizer, model, mesh, *, seq_len: int, batch_size: int, total_steps: int,
                 template: str = "llama3"):
        """`cfg`: an EvalConfig; `model`: the model's structure (abstract is enough; set to eval mode)."""
        self.cfg, self.total = cfg, total_steps
        self.batch_size = batch_size
        prefix = document_prefix(tokenizer, model.cfg)
        self.sources = [(s.name, *source_rows(Source(s.name, list(s.paths)), tokenizer, seq_len, prefix, template)[:2])
                        for s in cfg.sources]
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
