"""OpenAI wire format: the request bodies the server accepts and the response bodies it sends.

Requests are strict: an unknown field, or an OpenAI field this server cannot honour with a non-default
value (penalties, logit_bias, echo, suffix, tools...), is a 400 naming the field rather than being ignored.
Extensions (vLLM's names): top_k, min_p, ignore_eos, stop_token_ids, skip_special_tokens, and
`sparse_attention`, a per-request retune of the server's sparse-attention algorithm.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


def _encodable(s: str) -> str:
    """Lone surrogates (legal in JSON escapes) cannot be tokenised: refuse them at the edge."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode (position {e.start}): lone surrogate escapes are not allowed") from None
    return s


Text = Annotated[str, AfterValidator(_encodable)]
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


class _Unsupported(BaseModel):
    """OpenAI fields this server accepts only at their neutral value."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, description="Accepted for compatibility; not used.")

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise ValueError(f"{name}={getattr(self, name)} is not supported by this server (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server (leave it out or empty)")
        return self


class SamplingFields(_Unsupported):
    """Sampling fields shared by both endpoints (OpenAI names, then vLLM's extensions)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Must be the served model name; None = the served model.")
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: Text | list[Text] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    sparse_attention: dict[str, Any] | None = Field(
        None, description="Per-request retune of the server's sparse attention, e.g. {'target_sparsity': 0.7}."
    )

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self


PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def _is_token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description=f"The prompt(s): {PROMPT_SHAPES}.")
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        """One clear message for every wrong shape (a plain union would list one error per member)."""
        if isinstance(v, str):
            return _encodable(v)
        if isinstance(v, list) and v:
            if all(isinstance(x, str) for x in v):
                return [_encodable(x) for x in v]
            if _is_token_ids(v) or all(_is_token_ids(x) for x in v):
                ids = v if _is_token_ids(v) else [t for x in v for t in x]
                if any(t < 0 for t in ids):
                    raise ValueError("token ids must be >= 0")
                return v
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        raise ValueError(f"prompt must be {PROMPT_SHAPES}")

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo=true is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported (only best_of == n)")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice is not supported by this server")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError(f"response_format {self.response_format!r} is not supported (only {{'type': 'text'}})")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        return self

    @property
    def output_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ------------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Sparsity(BaseModel):
    """Achieved sparsity of this request per phase (skipped / total attention work; None = dense)."""

    prefill: float | None = None
    decode: float | None = None


class _ChoiceEnd(BaseModel):
    """The fields every finished choice carries (completions and chat alike)."""

    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionChoice(_ChoiceEnd):
    text: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    sparsity: Sparsity | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_ChoiceEnd):
    message: ChatResponseMessage


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    sparsity: Sparsity | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        """OpenAI deltas carry only what changed: {"content": "..."}."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    sparsity: Sparsity | None = None  # on the usage chunk only


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    sparsity: Sparsity | None = None  # on the usage chunk only


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sparse-llm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
