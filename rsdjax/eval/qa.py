"""Q&A jsonl evaluation: the loss on the answers, and greedy answers scored against the reference.

    exact_match      normalised answer == normalised reference
    contains_answer  the normalised reference occurs in the normalised answer
Normalisation (as SQuAD's, without dropping articles, which would mangle Japanese): Unicode NFKC,
case-folded, punctuation removed, whitespace collapsed. Answers come from the inference engine
(`rsdjax.infer.generate`), greedy, one user turn per question.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata

import numpy as np

from rsdjax.data.packing import BATCH_KEYS
from rsdjax.eval.data import TextStats
from rsdjax.sft.data import encode, render


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def is_qa_file(path) -> bool:
    """A .jsonl whose first record is a Q&A / chat example rather than a `text` document."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.suffix != ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False  # the text reader reports the bad line
                return isinstance(record, dict) and ("question" in record or "messages" in record)
    return False


def answer_rows(tokenizer, conversations: list[list[dict]], seq_len: int, template: str) -> tuple[list[dict], TextStats]:
    """One row per conversation, loss only on the assistant's tokens (as fine-tuning trains them)."""
    rows, stats = [], TextStats()
    for messages in conversations:
        ex = encode(tokenizer, messages, template)
        n = min(len(ex.tokens), seq_len)
        row = {k: np.zeros(seq_len, np.float32 if k == "loss_mask" else np.int32) for k in BATCH_KEYS}
        row["tokens"][:n], row["targets"][:n] = ex.tokens[:n], ex.targets[:n]
        row["loss_mask"][:n] = ex.loss_mask[:n]
        row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
        rows.append(row)
        for m in messages:
            if m["role"] == "assistant":
                stats.chars += len(m["content"])
                stats.bytes += len(m["content"].encode("utf-8"))
                stats.tokens += len(tokenizer.encode(m["content"]))
        stats.documents += 1
    return rows, stats


@dataclasses.dataclass
class QAResult:
    questions: list[str]
    references: list[str]
    answers: list[str]

    @property
    def exact_match(self) -> float:
        return float(np.mean([normalise(a) == normalise(r) for a, r in zip(self.answers, self.references)]))

    @property
    def contains_answer(self) -> float:
        return float(np.mean([normalise(r) in normalise(a) for a, r in zip(self.answers, self.references)]))

    def to_json(self) -> dict:
        return {"exact_match": self.exact_match, "contains_answer": self.contains_answer,
                "items": [{"question": q, "reference": r, "answer": a}
                          for q, r, a in zip(self.questions, self.references, self.answers)]}


def greedy_answers(engine, tokenizer, conversations: list[list[dict]], template: str,
                   max_new_tokens: int) -> QAResult:
    """Ask each conversation's turns up to its last assistant message; compare with that message."""
    from rsdjax.infer.generate import generate
    from rsdjax.infer.interface import SamplingParams

    prompts, questions, refs = [], [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = messages[:last]
        prompts.append([i for ids, _ in render(tokenizer, context, template, add_generation_prompt=True) for i in ids])
        questions.append(next((m["content"] for m in reversed(context) if m["role"] == "user"), ""))
        refs.append(messages[last]["content"])
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    done = generate(engine, prompts, params, tokenizer=tokenizer)
    return QAResult(questions, refs, [c.text.strip() for c in done])
