"""Tokenizers: HF `tokenizers` tokenizer.json + the checkpoint's tokenizer_config.json and chat template.

Special tokens (bos/eos/pad/unk, whether to add BOS) and the chat template come from the checkpoint:
`tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`, or a GGUF's metadata
(`Tokenizer.load("model.gguf")`). Tokenizers rsdjax trains itself register the Llama-3 special
tokens and carry the Llama-3 template. Training and extending tokenizers lives in `rsdjax.vocab`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from rsdjax.chat import LLAMA3_TEMPLATE, ChatTemplate, ChatTemplateError

# Llama-3 special tokens; our own trained tokenizers register them too.
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS, EOS, START_HEADER, END_HEADER, EOT)
LLAMA3_CONFIG = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True}
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
TEMPLATE_FILE = "chat_template.jinja"


class TokenizerError(ValueError):
    pass


def _token_str(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class Tokenizer:
    """encode/decode, the checkpoint's special tokens, and its chat template."""

    hf: HFTokenizer
    path: Path | None = None
    config: dict = field(default_factory=dict)  # tokenizer_config.json (special tokens, add_bos_token ...)
    chat_template: str | None = None

    def __post_init__(self):
        # a Llama-3 vocabulary (rsdjax-trained ones included): Llama-3's conventions where the config is silent
        if all(self.hf.token_to_id(t) is not None for t in SPECIAL_TOKENS):
            self.config = {**LLAMA3_CONFIG, **self.config}

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.suffix.lower() == ".gguf":
            return cls.from_gguf(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise TokenizerError(f"{file}: no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{file}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        config, template = _read_config(file.parent) if path.is_dir() or file.name == "tokenizer.json" else ({}, None)
        return cls(hf, file, config, template)

    @classmethod
    def from_gguf(cls, path: Path) -> "Tokenizer":
        from rsdjax.checkpoint import gguf, gguf_tokenizer

        hf, config = gguf_tokenizer.build(gguf.GGUFFile(path))
        return cls(hf, Path(path), {k: v for k, v in config.items() if k != "chat_template"},
                   config.get("chat_template"))

    @classmethod
    def for_model(cls, model_path: str | Path) -> "Tokenizer | None":
        """The tokenizer that belongs to a model path (its directory's tokenizer.json, or its GGUF), if any."""
        path = Path(model_path)
        if path.suffix.lower() == ".gguf" and path.is_file():
            return cls.from_gguf(path)
        return cls.load(path) if (path / "tokenizer.json").exists() else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    def special(self, key: str) -> str | None:
        return _token_str(self.config.get(key))

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.special("bos_token"))

    @property
    def add_bos(self) -> bool:
        """Whether plain text gets BOS in front: tokenizer_config's add_bos_token, else what the
        tokenizer.json post-processor does (Llama-3's adds it), as transformers decides."""
        if self.bos_id is None:
            return False
        if "add_bos_token" in self.config:
            return bool(self.config["add_bos_token"])
        return self.hf.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.special("eos_token"))

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.special("pad_token"))

    @property
    def eos_ids(self) -> list[int]:
        """The tokenizer's EOS, plus Llama-3's end-of-turn token where the vocabulary has it."""
        ids = [self.eos_id, self.token_id(EOT) if self.token_id(START_HEADER) is not None else None]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """tokenizer.json, tokenizer_config.json and chat_template.jinja, as transformers 5 writes them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
                  **{k: v for k, v in self.config.items() if k != "chat_template"}}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        template = self.template_source()
        if template is not None:
            (directory / TEMPLATE_FILE).write_text(template, encoding="utf-8")
        return directory / "tokenizer.json"

    def with_hf(self, hf: HFTokenizer) -> "Tokenizer":
        """The same special tokens and template over another tokenizer.json (an extension of this one)."""
        return Tokenizer(hf, None, dict(self.config), self.chat_template)

    # ------------------------------------------------------------ chat

    def template_source(self) -> str | None:
        """The checkpoint's template; else Llama-3's when the vocabulary has its special tokens."""
        if self.chat_template:
            return self.chat_template
        if all(self.token_id(t) is not None for t in SPECIAL_TOKENS):
            return LLAMA3_TEMPLATE
        return None

    def template(self) -> ChatTemplate:
        source = self.template_source()
        if source is None:
            raise TokenizerError(f"{self.path}: the tokenizer has no chat template (no chat_template in "
                                 "tokenizer_config.json, no chat_template.jinja) and no known chat format")
        special = {k: self.special(k) for k in SPECIAL_KEYS}
        return ChatTemplate(source, special, where=f"{self.path}: chat template")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.template().render(messages, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation, as transformers' `apply_chat_template(tokenize=True)`."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def chat_ids_and_mask(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """(ids of the rendered conversation, True on every token of an assistant turn): the SFT loss mask.

        Assistant turns are found by rendering (`ChatTemplate.assistant_spans`), so any template works;
        a token is an assistant token when its characters lie in an assistant turn."""
        ends = tuple(t for t in (self.special("eos_token"), EOT) if t)
        text, spans = self.template().assistant_spans(messages, end_markers=ends)
        enc = self.hf.encode(text, add_special_tokens=False)
        marks = np.zeros(len(text) + 1, np.int32)
        for a, b in spans:
            marks[a] += 1
            marks[b] -= 1
        inside = np.cumsum(marks) > 0
        mask = [bool(e > s and inside[s:e].all()) for s, e in enc.offsets]
        return list(enc.ids), mask


def _read_config(directory: Path) -> tuple[dict, str | None]:
    """tokenizer_config.json (+ special_tokens_map.json) and the chat template, as transformers reads them."""
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = directory / name
        if f.exists():
            try:
                config.update(json.loads(f.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{f}: invalid JSON ({e})") from None
    template = config.pop("chat_template", None)
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = directory / TEMPLATE_FILE
    if jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    return config, template


__all__ = ["Tokenizer", "TokenizerError", "ChatTemplateError", "BOS", "EOS", "EOT", "SPECIAL_TOKENS"]
