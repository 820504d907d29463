"""Chat templates: the model's own Jinja template, rendered the way transformers renders it.

Same environment as `transformers` (jinja2 `ImmutableSandboxedEnvironment`, trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII),
same variables (`messages`, `add_generation_prompt`, the special tokens, `tools` only when given).
`{% generation %}` blocks (transformers' assistant-mask marker) render their body.

`assistant_spans` finds where each assistant turn sits in the rendered text by rendering the
conversation up to that turn with and without it, so the SFT loss mask follows any template; no
format is assumed.
"""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The Llama-3 chat format, for tokenizers rsdjax trains itself (they carry these special tokens).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# How Q&A pairs become text (fine-tuning, eval): "chat" the tokenizer's own template, "llama3" the
# one above, "plain" question and answer lines. Here, not in rsdjax.sft, so the CLI's parser can
# list them without importing the trainer.
TEMPLATES = ("chat", "llama3", "plain")


class ChatTemplateError(ValueError):
    """A template that cannot be compiled or that raised while rendering; the message says which."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' marker for assistant text; renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """One compiled template plus the special-token strings it may use (`bos_token`, `eos_token` ...)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, where: str = "chat template"):
        self.source, self.where = source, where
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message})") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None,
               **extra) -> str:
        _check_messages(messages)
        variables = {**self.special_tokens, **extra, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        if tools is not None:
            variables["tools"] = tools
        try:
            return self.template.render(**variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{self.where}: the template raised: {e}") from None
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            raise ChatTemplateError(f"{self.where}: the template failed on these messages "
                                    f"({type(e).__name__}: {e})") from None

    def assistant_spans(self, messages: list[dict], end_markers: tuple[str, ...] = ()) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, [start, end) character spans of every assistant turn).

        A span is what the template adds for that turn after the generation prompt: the answer and its
        end-of-turn text, cut just after the first of `end_markers` (e.g. the EOS token) when one
        follows the answer, so text the model never generates (a newline after <|im_end|>) is left out.
        """
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, msg in enumerate(messages):
            if msg.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else \
                self.render([], add_generation_prompt=True)
            upto = self.render(messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ChatTemplateError(f"{self.where}: rendering is not incremental at message {i} (the text "
                                        "before an assistant turn changes once it is added), so its span is unknown")
            start, end = len(before), len(upto)
            content_at = upto.find(msg["content"], start) if msg["content"] else start
            if content_at >= 0:
                after = content_at + len(msg["content"])
                cuts = [upto.find(m, after) + len(m) for m in end_markers if m and upto.find(m, after) >= 0]
                end = min([end, *cuts])
            spans.append((start, end))
        return full, spans


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise ChatTemplateError(f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i}: needs a string 'role' and string 'content', got {m!r}")
