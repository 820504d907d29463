"""Loss, perplexity, bits per byte and characters per token of one evaluated source.

    loss            = total NLL / predicted tokens                       (nats per token)
    perplexity      = exp(loss)
    bits_per_byte   = total NLL / (ln 2 x UTF-8 bytes of the text)
    chars_per_token = Unicode characters of the text / tokens of the text

Bits per byte does not depend on the tokenizer: the numerator is the model's code length for the
whole text (every token predicted once, the first from BOS) and the denominator is the text's size,
so two models with different tokenizers are compared on the same scale (per-token loss is not).
"""
from __future__ import annotations

import dataclasses
import math

from rsdjax.eval.data import TextStats, stack_batches


@dataclasses.dataclass
class SourceResult:
    name: str
    nll: float  # total NLL in nats over the predicted tokens
    predicted: int  # tokens whose NLL is counted
    text: TextStats

    @property
    def loss(self) -> float:
        return self.nll / max(self.predicted, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * max(self.text.bytes, 1))

    @property
    def chars_per_token(self) -> float:
        return self.text.chars / max(self.text.tokens, 1)

    def to_json(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "chars_per_token": self.chars_per_token, "nll_nats": self.nll, "predicted_tokens": self.predicted,
                **dataclasses.asdict(self.text)}


def evaluate_rows(step, state, name: str, rows: list[dict], stats: TextStats, batch_size: int) -> SourceResult:
    """Run `step` (an EvalStep) over one source's rows and sum its NLL (float64 on the host)."""
    nll, predicted = 0.0, 0.0
    for batch in stack_batches(rows, batch_size):
        row_nll, row_tokens, _ = step(state, batch)
        nll += float(row_nll.sum())
        predicted += float(row_tokens.sum())
    return SourceResult(name, nll, int(round(predicted)), stats)
