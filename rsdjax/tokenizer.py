"""Tokenizers (HF `tokenizers` tokenizer.json) and the Llama-3 chat format.

Training and extending tokenizers lives in `rsdjax.vocab`; this module only loads and uses them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

# Llama-3 special tokens; our own trained tokenizers register them too, so one chat format serves all.
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT)


class TokenizerError(ValueError):
    pass


@dataclass
class Tokenizer:
    """A thin typed wrapper: encode/decode, special ids, and the chat template."""

    hf: HFTokenizer
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise TokenizerError(f"{file}: no tokenizer.json")
        try:
            return cls(HFTokenizer.from_file(str(file)), file)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{file}: cannot read tokenizer ({str(e).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(BOS)

    @property
    def eos_ids(self) -> list[int]:
        return [i for i in (self.token_id(EOS), self.token_id(EOT)) if i is not None]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                  "model_max_length": 1 << 30}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return directory / "tokenizer.json"

    # ------------------------------------------------------------ chat

    def chat_pieces(self, messages: list[dict], add_generation_prompt: bool = True) -> list[tuple[list[int], bool]]:
        """The Llama-3 chat format as (token ids, is_assistant_content) pieces, so SFT can mask the prompt."""
        missing = [t for t in SPECIAL_TOKENS if self.token_id(t) is None]
        if missing:
            raise TokenizerError(f"{self.path}: tokenizer lacks chat special token {missing[0]}")
        pieces: list[tuple[list[int], bool]] = [([self.bos_id], False)]
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise TokenizerError(f"message {i}: needs role system|user|assistant and string content, got {msg!r}")
            header = [self.token_id(START_HEADER), *self.encode(role), self.token_id(END_HEADER), *self.encode("\n\n")]
            pieces.append((header, False))
            # the assistant's answer and its end-of-turn token are what the model learns to produce
            pieces.append((self.encode(content) + [self.token_id(EOT)], role == "assistant"))
        if add_generation_prompt:
            pieces.append(([self.token_id(START_HEADER), *self.encode("assistant"), self.token_id(END_HEADER),
                            *self.encode("\n\n")], False))
        return pieces

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return [i for ids, _ in self.chat_pieces(messages, add_generation_prompt) for i in ids]
