"""Greedy answers to a few questions, for showing a model before and after fine-tuning.

Answers come from the inference engine (`rsdjax.infer`), the same path as `rsdjax generate` and the
server, LoRA attached or not; the questions are asked as single user turns in the data's template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from rsdjax.tokenizer import Tokenizer


def answer(model, tokenizer: Tokenizer, questions: Sequence[str], template: str = "chat",
           max_new_tokens: int = 48, mesh=None) -> list[str]:
    """The model's greedy answer to each question."""
    from rsdjax.eval.qa import greedy_answers
    from rsdjax.infer.engine import SlotEngine

    if not questions:
        return []
    model.eval()
    engine = SlotEngine(model, max_slots=min(len(questions), 8), eos_token_ids=list(tokenizer.eos_ids), mesh=mesh)
    # an empty assistant turn marks where the answer goes (greedy_answers asks everything before it)
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": ""}] for q in questions]
    return greedy_answers(engine, tokenizer, conversations, template, max_new_tokens).answers


def compare_answers(base: str | Path, adapter: str | Path, questions: Sequence[str],
                    tokenizer: str | Path | None = None, template: str = "chat", max_new_tokens: int = 48,
                    mesh=None) -> list[dict]:
    """[{question, before, after}]: the base model's answers, then with the PEFT adapter applied."""
    from rsdjax.loading import load_model
    from rsdjax.checkpoint.peft import apply_adapter

    tok = Tokenizer.load(tokenizer or base)
    model = load_model(base, mesh=mesh)
    before = answer(model, tok, questions, template, max_new_tokens, mesh)
    after = answer(apply_adapter(model, adapter), tok, questions, template, max_new_tokens, mesh)
    return [{"question": q, "before": b, "after": a} for q, b, a in zip(questions, before, after)]


def show_answers(questions: Sequence[str], before: Sequence[str], after: Sequence[str], out=print) -> None:
    """Print each question with the answers before and after fine-tuning (the demo's output)."""
    for q, b, a in zip(questions, before, after):
        out(f"\nQ: {q}\n  before: {b}\n  after:  {a}")
