"""Tokenizer training and extension (resizing a model's vocabulary afterwards: `rsdjax.model.resize`).

This is TEDLLM's first step (Llama-3's 128,256 tokens -> 141,056 for Japanese): learn new tokens
from a new-language corpus while every old token keeps its id, then grow the embedding and LM head.

* `train_tokenizer`: byte-level BPE with the Llama-3 pre-tokenizer split and special tokens.
* `extend_tokenizer`: *continued* BPE. The corpus is first tokenized by the base tokenizer, then
  merges are learned on top of those base tokens and appended after the base merges. Because every
  new merge joins two symbols that really occur next to each other after base tokenization, each
  new token is reachable, and base merges keep priority. (Training a fresh BPE on the new corpus and
  taking its unseen tokens, the usual shortcut, can produce tokens that the combined merge order
  never builds.)
"""
from __future__ import annotations

import heapq
import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from rsdjax.tokenizer import SPECIAL_TOKENS, Tokenizer

# Llama-3's pre-tokenizer split (tiktoken cl100k style): contractions, letter runs, 1-3 digit groups,
# punctuation runs, newlines and spaces. Japanese letter runs stay whole words.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class VocabError(ValueError):
    """A tokenizer or vocabulary operation that cannot be done; says what and where."""


# ---------------------------------------------------------------- corpus reading


def read_texts(paths: Sequence[str | Path], exclude: Iterable[str | Path] = ()) -> list[str]:
    """Documents from .txt files (one per file) and .jsonl files (one per line, field `text`),
    leaving out the files in `exclude` (held-out evaluation files)."""
    from rsdjax.data.sources import iter_documents, expand_paths

    skip = {Path(f).resolve() for f in exclude}
    return list(iter_documents([f for f in expand_paths(paths) if f.resolve() not in skip]))


def chars_per_token(tok: Tokenizer, texts: Iterable[str]) -> float:
    texts = list(texts)
    chars = sum(len(t) for t in texts)
    tokens = sum(len(e.ids) for e in tok.hf.encode_batch(texts, add_special_tokens=False)) if texts else 0
    return chars / max(tokens, 1)


# ---------------------------------------------------------------- training


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer like Llama-3's, with the Llama-3 special tokens registered."""
    texts = [t for t in texts if t]
    if not texts:
        raise VocabError("cannot train a tokenizer on an empty corpus")
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise VocabError(f"vocab_size={vocab_size} is below the byte alphabet plus special tokens ({floor})")
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


# ---------------------------------------------------------------- extension


def _bpe_parts(tok: Tokenizer) -> tuple[dict, dict[str, int], list[tuple[str, str]]]:
    spec = json.loads(tok.hf.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise VocabError(f"{tok.path or 'tokenizer'}: extension needs a BPE tokenizer, got {model.get('type')}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return spec, dict(model["vocab"]), merges


def learn_merges(words: Counter, num_new: int, known: set[str], min_frequency: int = 2) -> list[tuple[str, str]]:
    """Greedy BPE on words that are already sequences of base tokens (as token strings).

    Each round merges the most frequent adjacent pair (ties broken by the pair itself, so the result
    is deterministic) and stops after `num_new` merges that create tokens not in `known`.
    Pair counts are updated incrementally; a lazy max-heap finds the best pair.
    """
    seqs = [list(w) for w in words]
    freq = list(words.values())
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    # heap of (-count, pair); pairs are compared as string tuples for deterministic ties
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    known = set(known)
    created = 0
    while created < num_new and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b
        merges.append(pair)
        if merged not in known:
            known.add(merged)
            created += 1
        touched: Counter = Counter()
        for i in list(where.pop(pair, ())):
            seq, f = seqs[i], freq[i]
            for p in zip(seq, seq[1:]):
                pair_count[p] -= f
                touched[p] += 1
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for p in zip(out, out[1:]):
                pair_count[p] += f
                where.setdefault(p, set()).add(i)
                touched[p] += 1
        pair_count.pop(pair, None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                pair_count.pop(p, None)
    return merges


def extend_tokenizer(base: Tokenizer, texts: Iterable[str], add: int, min_frequency: int = 2) -> Tokenizer:
    """A copy of `base` with up to `add` new tokens learned from `texts`; every old id is unchanged.

    New tokens get ids after the largest existing id (vocabulary and added/special tokens), so a
    Llama-3 base (128,000 BPE tokens + 256 specials) grows from id 128,256 upwards.
    """
    if add <= 0:
        raise VocabError(f"--add must be positive, got {add}")
    texts = [t for t in texts if t]
    if not texts:
        raise VocabError("cannot extend a tokenizer from an empty corpus")
    spec, vocab, merges = _bpe_parts(base)
    pre = base.hf.pre_tokenizer
    words: Counter = Counter()
    for text in texts:
        for piece, _ in (pre.pre_tokenize_str(text) if pre is not None else [(text, None)]):
            words[tuple(t.value for t in base.hf.model.tokenize(piece))] += 1
    new_merges = learn_merges(words, add, set(vocab), min_frequency)
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))])
    for a, b in new_merges:
        if a + b not in vocab:
            vocab[a + b] = next_id
            next_id += 1
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [list(m) for m in merges + new_merges]
    # the base's special tokens, add_bos_token and chat template carry over: an extended chat tokenizer still chats
    ext = base.with_hf(HFTokenizer.from_str(json.dumps(spec, ensure_ascii=False)))
    check_extension(base, ext)
    return ext


def check_extension(old: Tokenizer, new: Tokenizer) -> None:
    """Raise unless every token of `old` has the same id in `new`."""
    new_vocab = new.hf.get_vocab(with_added_tokens=True)
    for token, i in old.hf.get_vocab(with_added_tokens=True).items():
        if new_vocab.get(token) != i:
            raise VocabError(f"{new.path or 'new tokenizer'}: token {token!r} has id {new_vocab.get(token)}, "
                             f"was {i} in {old.path or 'the old tokenizer'}; it is not an extension")
