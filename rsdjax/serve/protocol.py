"""OpenAI API request and response bodies (the subset we serve), as pydantic models.

An out-of-range value is a 400 naming the field. Unknown fields are accepted and ignored, as vLLM
does (routers in front of servers add their own, e.g. vllm-router's `no_stop_trim`): the server
names them in a warning and in the `x-ignored-fields` response header (`ignored_fields`), and
`rsdjax serve --strict-fields` makes them a 400 again. Fields of the OpenAI API we do not implement are accepted only at
their neutral value (best_of=n, no suffix, no logit_bias), so clients that always send
them keep working. vLLM extensions: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
prompt_logprobs. Legacy completions take `echo` and `max_tokens: 0` (score the prompt, generate
nothing), which is how lm-evaluation-harness asks for loglikelihoods.
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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict | bool = Field(alias="schema")  # `schema` itself would shadow pydantic's method
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), json_schema."""

    model_config = _BODY
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_for_json_schema(cls, v, info: ValidationInfo):
        if info.data.get("type") == "json_schema" and v is None:
            raise ValueError("type json_schema needs a json_schema object with a schema")
        return v


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice, json_object."""

    model_config = _BODY
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None


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
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="vLLM: top-N per prompt token")
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def constraints(self) -> list[tuple[str, str, object]]:
        """The output constraints asked for (one at most is valid), as (kind, field name for errors,
        value); kinds: json_schema, json_object, regex, choice."""
        found = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("json_object", "response_format", None))
        elif rf is not None and rf.type == "json_schema":
            found.append(("json_schema", "response_format.json_schema.schema", rf.json_schema.schema_))
        so = self.structured_outputs
        if so is not None:
            for kind, name, value in (("json_schema", "json", so.json_), ("regex", "regex", so.regex),
                                      ("choice", "choice", so.choice),
                                      ("json_object", "json_object", True if so.json_object else None)):
                if value is not None:
                    found.append((kind, f"structured_outputs.{name}", value))
        for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice")):
            if getattr(self, name) is not None:
                found.append((kind, name, getattr(self, name)))
        return found

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
                        prompt_logprobs: int | None = None, guide=None, defaults: dict | None = None) -> SamplingParams:
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
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs, guide=guide)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo or prompt_logprobs")
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

    @field_validator("suffix", "logit_bias")
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
    # known to OpenAI but not served: ignoring them like unknown fields would silently change the answer
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None

    @field_validator("tools", "functions", "function_call", "tool_choice")
    @classmethod
    def _no_tool_calls(cls, v):
        if v and v != "none":
            raise ValueError("not supported: this server does not call tools")
        return v

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


class LoadLoraRequest(BaseModel):
    model_config = _BODY
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    model_config = _BODY
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM sends it; names are what we key on


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
    root: str | None = None  # an adapter's directory
    parent: str | None = None  # an adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
