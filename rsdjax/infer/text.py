"""Token ids -> streamed text, with stop strings: `StopStringMatcher`.

Incremental detokenisation (as vLLM does it): decode a short window of recent ids and emit only
text that is new and complete, so a UTF-8 character split over byte-level tokens is never emitted
half-done ("\\ufffd"), and SentencePiece word-initial spaces come out right (the window starts with
a few prompt tokens for context).

Stop strings: text that could be the start of a stop string is held back until it either
completes one (the output ends just before it, the stop string itself is not emitted) or cannot
any more. So the concatenation of everything `push` and `finish` return is exactly the full
decoded text cut before the first stop string, and no partial stop string ever reaches a client.
"""
from __future__ import annotations

from typing import Sequence

CONTEXT_TOKENS = 5  # prompt tokens kept in front of the output for correct word boundaries


class StopStringMatcher:
    """Feed token ids with `push`; it returns the text safe to show now. Call `finish` at the end."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._ids = list(prompt_ids)[-CONTEXT_TOKENS:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._held = ""  # decoded text not yet emitted because it may begin a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found: no more text will come

    def feed(self, token_id: int, finish_reason: str | None) -> tuple[str, str | None]:
        """One engine event -> (text to show now, finish reason or None). The CLI and the server both
        go through here, so the same request gives the same text from either.

        A token that ended the completion as a stop token (EOS or a stop id: finish "stop") adds no
        text, as in vLLM (`include_stop_str_in_output` off); a stop string ends it with "stop".
        """
        piece = self.push(token_id) if finish_reason != "stop" else ""
        if self.stopped:
            return piece, "stop"
        if finish_reason is not None:
            piece += self.finish()
        return piece, finish_reason

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a multi-byte character still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(full[len(prefix):])

    def finish(self) -> str:
        """The rest: text held back for a stop string that never came, and any incomplete tail."""
        if self.stopped:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        out = self._release(full[len(prefix):] if len(full) > len(prefix) else "", final=True)
        return out

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, new: str, final: bool = False) -> str:
        text = self._held + new
        hits = [(text.find(s), s) for s in self.stop if s in text]
        if hits:
            cut = min(i for i, _ in hits)
            self.stopped = True
            self._held = ""
            return self._emit(text[:cut])
        keep = 0 if final else self._partial_stop_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return self._emit(text[:len(text) - keep])

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, text: str) -> str:
        self.text += text
        return text
