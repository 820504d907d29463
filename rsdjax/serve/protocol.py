"""OpenAI API request and response bodies (the subset we serve), as pydantic models.

An out-of-range value is a 400 naming the field. Unknown fields are accepted and ignored, as vLLM
does (routers in front of servers add their own, e.g. vllm-router's `no_stop_trim`): the server
names them in a warning and in the `x-ignored-fields` response header (`ignored_fields`), and
`rsdjax serve --strict-fields` makes them a 400 again. Fields of the OpenAI API we do not implement are accepted only at
their neutral value (echo=false, best_of=n, no suffix, no logit_bias), so clients that always send
them keep working. vLLM extensions: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rsdjax.infer.interface import SamplingParams

MAX_LOGPROBS = 20
_BODY = ConfigDict(extra="allow")  # unknown fields kept aside (model_extra) so they can be named


def ignored_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields of `body` (nested bodies included) that no model declares."""
    out = [f"{prefix}{k}" for k in body.model_extra or {}]
    for name in type(body).model_fields:
        value = getattr(body, name)
        if isinstance(value, BaseModel):
            out += ignored_fields(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out += ignored_fields(item, f"{prefix}{name}.{i}.")
    return out


class StreamOptions(BaseModel):
    model_config = _BODY
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = _BODY

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    # field validators (not model validators) so that a 400 names the offending field as its `param`
    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v, info: ValidationInfo):
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, v):
        if any(not s for s in ([v] if isinstance(v, str) else v or [])):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int,
                        defaults: dict | None = None) -> SamplingParams:
        """`defaults` (the checkpoint's generation_config.json) fill the sampling fields the request did not set."""
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        s = {**given, **{k: v for k, v in (defaults or {}).items() if k in given and k not in self.model_fields_set}}
        return SamplingParams(
            max_tokens=max_tokens, temperature=s["temperature"], top_p=s["top_p"],
            top_k=max(s["top_k"], 0), min_p=s["min_p"], repetition_penalty=s["repetition_penalty"],
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            # n samples from one seeded request must differ from each other yet be reproducible
            seed=None if self.seed is None else self.seed + choice,
            stop_token_ids=list(self.stop_token_ids or []), stop=self.stop_list,
            ignore_eos=self.ignore_eos, logprobs=logprobs)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_non_empty(cls, v):
        if not v or any(not isinstance(p, int) and len(p) == 0 for p in ([v] if isinstance(v, str) else v)):
            raise ValueError("must not be empty")
        return v

    @field_validator("echo", "suffix", "logit_bias")
    @classmethod
    def _unsupported(cls, v):
        if v:
            raise ValueError("not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v, info: ValidationInfo):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("only best_of == n is supported")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class TextPart(BaseModel):
    model_config = _BODY
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _BODY
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info: ValidationInfo):
        if v and not info.data.get("logprobs"):
            raise ValueError("requires logprobs to be true")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    model_config = _BODY
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = _BODY
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses
# Completion and chat bodies and chunks are built as plain dicts in `openai_api.py` (one per token
# when streaming, so no validation cost there); the `openai` client's own types check them in tests.


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "rsdjax"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
