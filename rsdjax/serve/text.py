"""Token ids -> text, one token at a time, and stop strings.

NOTE for whoever merges: `rsdjax.infer.text.StopStringMatcher` (inference branch) covers the same
ground; this module exists because the server was written before that branch was visible. Keep one.

Incremental detokenisation follows vLLM: decode a short window of recent ids and emit only the
text that is new and complete, so that a UTF-8 character split across byte-level tokens is never
emitted half-done ("\ufffd"), and SentencePiece leading spaces come out right (the window starts
with a few prompt tokens for context).
"""
from __future__ import annotations

from rsdjax.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens kept in front of the output for correct word boundaries


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """The new complete text that `token_id` adds (possibly "", when a character is still partial)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the output (an incomplete character shows as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) else ""


class StopStringFilter:
    """Holds back just enough text to see a stop string that spans several tokens.

    `push(text)` returns (text safe to emit, stopped); once stopped, the output ends before the stop
    string (OpenAI semantics: the stop string itself is not returned).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        start = max(0, len(self.buffer) - self.hold)  # a stop string can begin in the held-back tail
        self.buffer += text
        hits = [i for i in (self.buffer.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
