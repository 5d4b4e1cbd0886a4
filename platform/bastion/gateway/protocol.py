"""Request bodies the gateway validates. Unknown OpenAI fields are allowed and passed through untouched; the
fields Bastion acts on (model, stream, token limits, tools) are checked so a bad value is a 400, not an engine
crash. Validation only: the upstream receives the client's own JSON, not a re-serialization.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

__all__ = ["ChatCompletionRequest", "CompletionRequest", "MessagesRequest", "ValidationError", "first_error"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class Message(_Open):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=64)


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class _Common(_Open):
    model: str = Field(min_length=1, max_length=200)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    n: StrictInt = Field(default=1, ge=1, le=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]

    @property
    def completion_limit(self) -> int | None:
        return self.max_tokens


class AnthropicMessage(_Open):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Open):
    """Anthropic's Messages body (`/v1/messages`): what the gateway acts on; vLLM's layer validates the rest."""

    model: str = Field(min_length=1, max_length=200)
    max_tokens: StrictInt = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stream: StrictBool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    stream_options: None = None  # not Anthropic's: the relay reads usage from message_start/message_delta

    @property
    def completion_limit(self) -> int:
        return self.max_tokens


def first_error(exc: ValidationError) -> tuple[str, str | None]:
    """A short message and the `param` path of the first validation error."""
    err = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return f"Invalid value for '{param}': {err['msg']}" if param else err["msg"], param
