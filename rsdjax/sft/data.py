"""Supervised fine-tuning data: Q&A / chat jsonl -> token rows with loss only on answer tokens.

A line is either `{"question": ..., "answer": ...}` (optionally `"system"`) or
`{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.
Each example is rendered with the tokenizer's own chat template (`chat`; the Llama-3 format for
rsdjax-trained tokenizers), the Llama-3 template (`llama3`), or `plain` text into (token ids,
is_answer) and becomes
    tokens = ids[:-1], targets = ids[1:], loss_mask = is_answer[1:]
so the model learns to produce the answers (and their end-of-turn token), never the prompt.

Packing puts several short examples into one row of `seq_len` tokens. Each example gets its own
`segment_ids` value (padding is segment 0, with no loss) and `positions` restart at 0, so with the
model's segment mask no token attends across examples and every example sees the positions it
would see alone.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from rsdjax.chat import LLAMA3_TEMPLATE, TEMPLATES
from rsdjax.tokenizer import Tokenizer

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class SFTDataError(ValueError):
    """Unusable fine-tuning data; the message names the file and line."""


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # int32 [n]: model input
    targets: np.ndarray  # int32 [n]: next token
    loss_mask: np.ndarray  # bool [n]: True where the target is answer text


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Every line of a Q&A / chat jsonl file as a list of chat messages."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: no such data file")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SFTDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            conversations.append(to_messages(record, where))
    if not conversations:
        raise SFTDataError(f"{path}: no examples (empty file)")
    return conversations


def to_messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise SFTDataError(
                    f"{where}: message {i} needs role system|user|assistant and string content, got {m!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise SFTDataError(f"{where}: no assistant message, so nothing to learn")
        return messages
    q, a = record.get("question"), record.get("answer")
    if not isinstance(q, str) or not isinstance(a, str):
        raise SFTDataError(f"{where}: needs string 'question' and 'answer' (or 'messages'); keys are {sorted(record)}")
    system = record.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) else []
    return head + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def render(tokenizer: Tokenizer, messages: list[dict], template: str = "chat",
           add_generation_prompt: bool = False) -> list[tuple[list[int], bool]]:
    """(token ids, is_answer) pieces. `chat`: the tokenizer's template, answers = the assistant turns it
    renders (`Tokenizer.chat_ids_and_mask`); `llama3`: the same with the Llama-3 template; `plain`:
    "Question: ...\\nAnswer: ..." + EOS for tokenizers without a chat format."""
    if template in ("chat", "llama3"):
        if template == "llama3":
            tokenizer = dataclasses.replace(tokenizer, chat_template=LLAMA3_TEMPLATE)
        if add_generation_prompt:
            return [(tokenizer.apply_chat_template(messages, add_generation_prompt=True), False)]
        ids, mask = tokenizer.chat_ids_and_mask(messages)
        return _runs(ids, mask)
    if template != "plain":
        raise SFTDataError(f"unknown chat template {template!r} (known: {', '.join(TEMPLATES)})")
    eos = tokenizer.eos_ids[:1]
    pieces = [([tokenizer.bos_id], False)] if tokenizer.bos_id is not None else []
    for m in messages:  # the prompt ends with "Answer:", so it is its own generation prompt
        if m["role"] == "assistant":
            pieces.append((tokenizer.encode(" " + m["content"]) + eos, True))
        elif m["role"] == "user":
            pieces.append((tokenizer.encode(f"Question: {m['content']}\nAnswer:"), False))
        else:
            pieces.append((tokenizer.encode(m["content"] + "\n"), False))
    return pieces


def _runs(ids: list[int], mask: list[bool]) -> list[tuple[list[int], bool]]:
    """Consecutive tokens with the same mask value as one piece."""
    pieces: list[tuple[list[int], bool]] = []
    for i, m in zip(ids, mask):
        if pieces and pieces[-1][1] == m:
            pieces[-1][0].append(i)
        else:
            pieces.append(([i], m))
    return pieces


def encode(tokenizer: Tokenizer, messages: list[dict], template: str = "chat") -> Example:
    ids, answer = [], []
    for piece, is_answer in render(tokenizer, messages, template):
        ids += piece
        answer += [is_answer] * len(piece)
    ids = np.asarray(ids, np.int32)
    answer = np.asarray(answer, bool)
    return Example(ids[:-1], ids[1:], answer[1:])


def load_examples(path: str | Path, tokenizer: Tokenizer, seq_len: int,
                  template: str = "chat") -> tuple[list[Example], dict]:
    """Encode a jsonl file; examples longer than `seq_len` are cut (stats say how many, and how many
    lost all their answer tokens and were dropped)."""
    examples, stats = [], {"examples": 0, "truncated": 0, "dropped": 0, "answer_tokens": 0}
    for messages in read_jsonl(path):
        ex = encode(tokenizer, messages, template)
        if len(ex.tokens) > seq_len:
            stats["truncated"] += 1
            ex = Example(ex.tokens[:seq_len], ex.targets[:seq_len], ex.loss_mask[:seq_len])
        if not ex.loss_mask.any():
            stats["dropped"] += 1
            continue
        examples.append(ex)
        stats["answer_tokens"] += int(ex.loss_mask.sum())
    stats["examples"] = len(examples)
    if not examples:
        raise SFTDataError(f"{path}: no example has answer tokens within seq_len={seq_len}")
    return examples, stats


def pack(examples: list[Example], seq_len: int, pack_examples: bool = True) -> dict[str, np.ndarray]:
    """Rows [N, seq_len] (first-fit in the given order; one example per row without packing)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex.tokens)
        slot = next((i for i, free in enumerate(room) if free >= n), None) if pack_examples else None
        if slot is None:
            rows.append([])
            room.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(ex)
        room[slot] -= n
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in BATCH_KEYS}
    out["loss_mask"] = np.zeros((len(rows), seq_len), bool)
    for r, row in enumerate(rows):
        start = 0
        for seg, ex in enumerate(row, 1):
            n = len(ex.tokens)
            sl = slice(start, start + n)
            out["tokens"][r, sl] = ex.tokens
            out["targets"][r, sl] = ex.targets
            out["loss_mask"][r, sl] = ex.loss_mask
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            start += n
    return out


def batches(examples: list[Example], seq_len: int, batch_size: int, seed: int = 0,
            pack_examples: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches: every epoch shuffles the examples, packs them, and deals rows in batches
    (the last rows of an epoch that do not fill a batch wrap to the next epoch)."""
    rng = np.random.default_rng(seed)
    carry = None
    while True:
        order = rng.permutation(len(examples))
        rows = pack([examples[i] for i in order], seq_len, pack_examples)
        if carry is not None:
            rows = {k: np.concatenate([carry[k], rows[k]]) for k in BATCH_KEYS}
        n = len(rows["tokens"]) // batch_size * batch_size
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in rows.items()}
        carry = {k: v[n:] for k, v in rows.items()}


def eval_batches(examples: list[Example], seq_len: int, batch_size: int, pack_examples: bool = True) -> list[dict]:
    """All examples once, in order; the last batch is padded with empty rows (no loss)."""
    rows = pack(examples, seq_len, pack_examples)
    pad = -len(rows["tokens"]) % batch_size
    rows = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in rows.items()}
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, len(rows["tokens"]), batch_size)]
