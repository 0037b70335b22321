"""Request bodies the gateway accepts, for validation and the OpenAPI schema.

Guarantees: the fields that the gateway's policy and keys read are type-checked strictly (no
string-to-number coercion), `model` and `messages`/`prompt` are required and non-empty, and every
other field — engine extras such as `top_k`, `repetition_penalty`, `guided_json` — is allowed and
passed to the engine untouched. Validation only checks: the gateway forwards the body it received.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import APIError, validation_error

JSONObject = dict[str, Any]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stream: bool | None = None
    stream_options: JSONObject | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(min_length=1)
    content: str | list[JSONObject] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[JSONObject] | None = None
    tool_choice: str | JSONObject | None = None
    response_format: JSONObject | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool | None = None
    suffix: str | None = None


def parse_json_object(raw: bytes) -> JSONObject:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({exc}).",
            code="invalid_json",
        ) from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def validate(model: type[_Request], body: JSONObject) -> None:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(list(exc.errors(include_url=False))) from exc


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            _text_chars(part.get("text") if isinstance(part, dict) else part) for part in content
        )
    return 0


def check_limits(body: JSONObject, *, max_messages: int, max_chars: int) -> None:
    """The operator's limits on a validated body: messages per request, text characters in the
    messages or the prompt. A 400 naming the limit, before anything else is done."""
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > max_messages:
            raise APIError(
                400,
                f"Too many messages: {len(messages)}, at most {max_messages} are accepted.",
                param="messages",
                code="too_many_messages",
            )
        chars = sum(_text_chars(m.get("content")) for m in messages if isinstance(m, dict))
        param = "messages"
    else:
        chars = _text_chars(body.get("prompt"))
        param = "prompt"
    if chars > max_chars:
        raise APIError(
            400,
            f"The request holds {chars} characters of text; at most {max_chars} are accepted.",
            param=param,
            code="content_too_long",
        )
