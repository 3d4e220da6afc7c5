"""The OpenAI API's request bodies (the fields splitveil honours, checked) and its error shape.

Requests are validated by pydantic in strict mode: every field must have its JSON type (`"5"` is not an integer,
`true` is not a token id, `"yes"` does not ask for a stream), as the OpenAI API checks its JSON schema; pydantic's
default lax mode coerced them and served a request that meant something else. Unknown fields are accepted and
ignored, as OpenAI-compatible servers do, except the ones whose meaning we cannot honour (tools, several choices,
log-probabilities, penalties), which are refused with a 400 naming the field, so that a client never silently gets
something else than it asked for.
Sizes are bounded before any work scales with them: the body by the edge's `--max-request-bytes`, the messages by
`MAX_MESSAGES`, the seed by what torch takes; `max_tokens` and the prompt's length in tokens by the model's context.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as in the OpenAI API
MAX_MESSAGES = 4096  # messages per chat request (each costs chat-template work before the context check)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch's generators accept


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, " ".join(message.split()), type, param, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and text completions share: the model, the budget, sampling, stop strings, streaming."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's default is 1 (sampling); 0 = greedy
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError("n: this server returns one choice per request (n=1)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported by this server (leave it out or 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs: not supported by this server")
        if self.tools or self.functions:
            raise ValueError("tools: tool calls are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt: must not be empty")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ValueError("prompt: give one prompt per request")
        if self.echo or self.logprobs or self.suffix or (self.best_of or 1) != 1:
            raise ValueError("echo, logprobs, suffix and best_of are not supported by this server")
        return self

    @property
    def budget(self) -> int | None:
        return self.max_tokens
