"""`evaluate_model`: a loaded model + named sources of files -> per-source metrics (what `rsdjax eval` prints).

A source is a list of paths (files, directories, globs). Text sources (.txt, .jsonl with `text`)
get loss / perplexity / bits per byte / characters per token; Q&A sources (.jsonl with
`question`+`answer` or `messages`) get the same on the answer tokens, and, when an engine is
given, exact-match and contains-answer of greedy answers.
"""
from __future__ import annotations

import dataclasses

from rsdjax.data.sources import expand_paths, iter_documents
from rsdjax.eval.data import EvalDataError, document_prefix, text_rows
from rsdjax.eval.metrics import SourceResult, evaluate_rows
from rsdjax.eval.qa import QAResult, answer_rows, greedy_answers, is_qa_file


@dataclasses.dataclass
class Source:
    name: str
    paths: list


@dataclasses.dataclass
class Evaluated:
    metrics: SourceResult
    qa: QAResult | None = None

    def to_json(self) -> dict:
        return {**self.metrics.to_json(), **({"qa": self.qa.to_json()} if self.qa else {})}


def source_rows(source: Source, tokenizer, seq_len: int, prefix: int, template: str):
    """(rows, text stats, conversations or None) of one source; Q&A and text files may not mix."""
    from rsdjax.sft.data import read_jsonl

    files = expand_paths(source.paths)
    if not files:
        raise EvalDataError(f"eval source '{source.name}': its paths match no .txt or .jsonl files")
    qa = [is_qa_file(f) for f in files]
    if any(qa) and not all(qa):
        raise EvalDataError(f"eval source '{source.name}' mixes Q&A and text files; give them as separate sources")
    if all(qa):
        conversations = [c for f in files for c in read_jsonl(f)]
        rows, stats = answer_rows(tokenizer, conversations, seq_len, template)
        return rows, stats, conversations
    rows, stats = text_rows(tokenizer, iter_documents(files), seq_len, prefix)
    if not rows:
        raise EvalDataError(f"eval source '{source.name}': no text in {', '.join(map(str, files))}")
    return rows, stats, None


def evaluate_model(model, tokenizer, sources: list[Source], mesh, *, seq_len: int, batch_size: int,
                   engine=None, template: str = "llama3", max_new_tokens: int = 64,
                   weights=None) -> dict[str, Evaluated]:
    """`weights`: int8 serving weights (rsdjax/model/quant.py) to evaluate instead of the model's own."""
    from rsdjax.eval.step import EvalStep, ServingEvalStep

    prefix = document_prefix(tokenizer, model.cfg)
    prepared = [(s, *source_rows(s, tokenizer, seq_len, prefix, template)) for s in sources]  # check all first
    step = (EvalStep(model, mesh, batch_size=batch_size) if weights is None
            else ServingEvalStep(model.cfg, weights, mesh, batch_size=batch_size))
    state = step.state_of(model)
    out = {}
    for source, rows, stats, conversations in prepared:
        metrics = evaluate_rows(step, state, source.name, rows, stats, batch_size)
        qa = (greedy_answers(engine, tokenizer, conversations, template, max_new_tokens)
              if conversations is not None and engine is not None else None)
        out[source.name] = Evaluated(metrics, qa)
    return out
