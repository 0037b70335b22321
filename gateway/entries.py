"""Cache entries an operator gives directly (`POST /admin/cache/entries`, `strata warm`).

Guarantees: an entry is `{"request": {...}, "response": "answer text" | completion object,
"route": "chat" | "completions" (optional), "usage": {"prompt_tokens", "completion_tokens"}
(optional)}`. The route is the one named, else `chat` for a request with `messages` and
`completions` for one with `prompt`. A bare answer text becomes the completion object an engine
would have sent for it (one choice, `finish_reason: "stop"`, usage from `usage` or zeros); a given
object must be a completion of that route (`chat.completion` with a `message` per choice, or
`text_completion` with a `text`). Anything else is a 400 in OpenAI's shape naming the field.
Whether the request may be cached at all is the flow's decision (`CompletionService.fill`).

Pure: no I/O.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from caches import usage_tokens
from gateway.assembly import Route
from gateway.errors import APIError
from gateway.schemas import parse_json_object

ENTRY_FIELDS = frozenset({"request", "response", "route", "usage"})
OBJECTS: dict[Route, str] = {"chat": "chat.completion", "completions": "text_completion"}


@dataclass(frozen=True, slots=True)
class Entry:
    route: Route
    request: dict[str, Any]
    response: str | dict[str, Any]
    usage: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Filled:
    """What a fill stored: the key's digest, the TTL, and what decided it (as in
    `X-Strata-TTL-Rule`)."""

    key: str
    ttl: int
    ttl_rule: str


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def route_of(request: Mapping[str, Any], named: Any = None) -> Route:
    """The route `request` is for: `named` when given, else guessed from its fields."""
    if named is not None:
        if named not in OBJECTS:
            raise _bad(f"route must be one of {sorted(OBJECTS)}, not {named!r}.", "route")
        route: Route = named
        return route
    if "messages" in request:
        return "chat"
    if "prompt" in request:
        return "completions"
    raise _bad("The request has neither `messages` (chat) nor `prompt` (completions).", "request")


def _check_object(route: Route, answer: dict[str, Any]) -> None:
    if answer.get("object") != OBJECTS[route]:
        raise _bad(f"A {route} answer must have object {OBJECTS[route]!r}.", "response.object")
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _bad("The answer needs a non-empty list of choices.", "response.choices")
    part = "message" if route == "chat" else "text"
    wanted = dict if route == "chat" else str
    if not all(isinstance(c, dict) and isinstance(c.get(part), wanted) for c in choices):
        raise _bad(f"Every choice of a {route} answer needs a {part}.", "response.choices")


def parse_entry(raw: bytes) -> Entry:
    """The entry in an admin request body, checked as far as it can be without the flow."""
    entry = parse_json_object(raw)
    if unknown := sorted(set(entry) - ENTRY_FIELDS):
        raise _bad(f"Unknown fields {unknown}; an entry has {sorted(ENTRY_FIELDS)}.", unknown[0])
    request = entry.get("request")
    if not isinstance(request, dict):
        raise _bad("`request` must be a completion request object.", "request")
    route = route_of(request, entry.get("route"))
    response = entry.get("response")
    if isinstance(response, dict):
        _check_object(route, response)
    elif not isinstance(response, str):
        raise _bad("`response` must be the answer text or a completion object.", "response")
    usage = entry.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _bad("`usage` must be an object of token counts.", "usage")
    return Entry(route, request, response, usage_tokens(entry))


def completion_object(
    route: Route, model: str, text: str, *, usage: tuple[int, int], created: int
) -> dict[str, Any]:
    """The answer an engine would have sent with `text` as its one, finished, choice."""
    prompt, completion = usage
    choice: dict[str, Any] = {"index": 0}
    if route == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason="stop")
    prefix = "chatcmpl" if route == "chat" else "cmpl"
    return {
        "id": f"{prefix}-strata-{secrets.token_hex(12)}",
        "object": OBJECTS[route],
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
