"""Structured output: grammars (JSON schema, regex, a choice of strings) compiled to per-step token masks.

llguidance does the grammar work on the host (Rust, no torch; a mask costs tens of microseconds);
the engine applies the masks on the device inside its jitted sampler (`sampling.apply_bitmask`), one
packed row per slot, so any mix of schemas and unconstrained rows runs in the same compiled step.

A `Guide` is one request's grammar state. The engine calls, for each sampled token of that request:
    guide.fill_bitmask(row)   # int32 [ceil(vocab / 32)]: bit j of word i allows token 32 i + j
    guide.consume(token)      # advance; once the grammar is complete only EOS is allowed
`GrammarCompiler` is made once per server (building the token trie takes ~1 s for a 128K vocab).
"""
from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

# Compact JSON as OpenAI's models write it (', ' and ': '), and no free whitespace: at temperature 1 a
# grammar that allows whitespace anywhere lets a small model wander through spaces and newlines.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema, regex or choice cannot be compiled (the message says why and where)."""


def one_line(message: str) -> str:
    """llguidance's multi-line errors (regex parser output with a caret drawing) as one line:
    the first line and the parser's own `error:` line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    detail = [line for line in lines[1:] if line.startswith("error:")]
    return "; ".join(lines[:1] + detail)


class Guide:
    """One request's llguidance matcher."""

    def __init__(self, matcher: "llguidance.LLMatcher"):
        self.matcher = matcher

    def fill_bitmask(self, row: np.ndarray) -> None:
        llg_numpy.fill_next_token_bitmask(self.matcher, row[None])

    def consume(self, token: int) -> None:
        self.matcher.consume_token(int(token))


class GrammarCompiler:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        """tokenizer_json: the HF `tokenizer.json` text; vocab_size: the model's (masks cover it all)."""
        self.vocab_size = int(vocab_size)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=self.vocab_size,
                                                eos_token=list(eos_token_ids) or None)

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> "GrammarCompiler":
        """From an `rsdjax.tokenizer.Tokenizer`."""
        return cls(tokenizer.hf.to_str(), vocab_size, eos_token_ids)

    def _compile(self, grammar: str, what: str) -> Guide:
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"{what}: {one_line(error)}")
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{what}: {matcher.get_error()}")
        return Guide(matcher)

    def json_schema(self, schema: Any, what: str = "json_schema") -> Guide:
        if isinstance(schema, bool) or not isinstance(schema, dict):
            raise GrammarError(f"{what}: a JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as e:
            raise GrammarError(f"{what}: {e}") from None
        return self._compile(grammar, what)

    def json_object(self) -> Guide:
        return self.json_schema({"type": "object"}, "response_format")

    def regex(self, pattern: str, what: str = "regex") -> Guide:
        return self._compile(llguidance.LLMatcher.grammar_from_regex(pattern), what)

    def choice(self, options: list[str], what: str = "choice") -> Guide:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError(f"{what}: give a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(o) for o in options)  # Lark string literals take JSON escapes
        return self._compile(llguidance.LLMatcher.grammar_from_lark(lark), what)
