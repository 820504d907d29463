"""Greedy answers to a few questions, for showing a model before and after fine-tuning.

Deliberately simple and independent of the serving engine: one fixed-size buffer, a full causal
forward per new token (cheap on the tiny demo models), compiled once per buffer size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rsdjax.sft.data import render
from rsdjax.tokenizer import Tokenizer


def answer(model, tokenizer: Tokenizer, questions: Sequence[str], template: str = "chat",
           max_new_tokens: int = 48) -> list[str]:
    """The model's greedy answer to each question (asked as a single user turn)."""
    if not questions:
        return []
    prompts = [[i for ids, _ in render(tokenizer, [{"role": "user", "content": q}], template,
                                       add_generation_prompt=True) for i in ids] for q in questions]
    limit = model.cfg.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= limit:
        raise ValueError(f"a demo question is {longest} tokens, the model allows {limit}")
    size = min(limit, -(-(longest + max_new_tokens) // 64) * 64)  # round up: fewer distinct compiles
    buf = np.zeros((len(prompts), size), np.int32)
    for r, p in enumerate(prompts):
        buf[r, :len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    start = lengths.copy()
    done = np.zeros(len(prompts), bool)
    eos = set(tokenizer.eos_ids)

    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_tokens(state, tokens, lengths):
        logits = nnx.merge(graphdef, state)(tokens)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return jnp.argmax(last, axis=-1)

    for _ in range(max_new_tokens):
        nxt = np.asarray(next_tokens(state, jnp.asarray(buf), jnp.asarray(lengths)))
        for r in np.flatnonzero(~done):
            if nxt[r] in eos or lengths[r] >= size:
                done[r] = True
                continue
            buf[r, lengths[r]] = nxt[r]
            lengths[r] += 1
        if done.all():
            break
    return [tokenizer.decode(buf[r, start[r]:lengths[r]]).strip() for r in range(len(prompts))]


def compare_answers(base: str | Path, adapter: str | Path, questions: Sequence[str],
                    tokenizer: str | Path | None = None, template: str = "chat", max_new_tokens: int = 48,
                    mesh=None) -> list[dict]:
    """[{question, before, after}]: the base model's answers, then with the PEFT adapter applied."""
    from rsdjax.loading import load_model
    from rsdjax.model.lora import apply_adapter

    tok = Tokenizer.load(tokenizer or base)
    model = load_model(base, mesh=mesh)
    before = answer(model, tok, questions, template, max_new_tokens)
    after = answer(apply_adapter(model, adapter), tok, questions, template, max_new_tokens)
    return [{"question": q, "before": b, "after": a} for q, b, a in zip(questions, before, after)]


def show_answers(questions: Sequence[str], before: Sequence[str], after: Sequence[str], out=print) -> None:
    """Print each question with the answers before and after fine-tuning (the demo's output)."""
    for q, b, a in zip(questions, before, after):
        out(f"\nQ: {q}\n  before: {b}\n  after:  {a}")
