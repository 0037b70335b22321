"""A stored completion, replayed as the event stream a streaming client expects.

Guarantees: `replay` renders any stored answer — streamed or not — as OpenAI's stream for its
route. Per choice: a role chunk; reasoning, content and refusal deltas of `TARGET_CHARS` to
`LIMIT_CHARS` characters, cut before whitespace where there is some (never one event per
character, never one blob); tool-call deltas (id, type and name first, then the arguments in
pieces); the finish chunk. Then, with `include_usage`, the usage chunk (`choices: []`; every other
chunk carries `usage: null`, as OpenAI sends them), then `data: [DONE]`. Every chunk carries the
stored id, created, model and system_fingerprint. Logprobs travel with the text they belong to when
their tokens spell it, else all of them with the first piece. Reassembling the replay
(`gateway.assembly`) gives back the stored answer. A body it cannot render faithfully raises
`ReplayError`, and the caller answers from the engine instead.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import orjson

from gateway.assembly import Route, unknown_fields
from gateway.sse import DONE_EVENT

TARGET_CHARS = 16
LIMIT_CHARS = 32

ANSWER_FIELDS = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"}
)
CHAT_CHOICE_FIELDS = frozenset({"index", "message", "logprobs", "finish_reason", "stop_reason"})
TEXT_CHOICE_FIELDS = frozenset({"index", "text", "logprobs", "finish_reason", "stop_reason"})
MESSAGE_FIELDS = frozenset(
    {"role", "content", "reasoning_content", "reasoning", "refusal", "tool_calls"}
)
Piece = tuple[str, Any]  # a piece of text and the logprobs that go with it


class ReplayError(ValueError):
    """The stored body cannot be rendered as a stream without losing something."""


@functools.cache
def _piece_pattern(target: int, limit: int) -> re.Pattern[str]:
    # The longest piece of target..limit characters that ends before a space or newline, else
    # `limit` characters (or what is left).
    return re.compile(rf".{{{target},{limit}}}(?=[ \n])|.{{1,{limit}}}", re.DOTALL)


def split_text(text: str, target: int = TARGET_CHARS, limit: int = LIMIT_CHARS) -> list[str]:
    """`text` in pieces of `target`..`limit` characters (the last may be shorter), each cut just
    before a space or newline when one falls in that window, so pieces start like tokens do."""
    pieces: list[str] = _piece_pattern(target, limit).findall(text)
    # A rest that fits in one piece stays one piece (the pattern may have cut it at a space).
    if len(pieces) > 1 and len(pieces[-2]) + len(pieces[-1]) <= limit:
        pieces[-2:] = [pieces[-2] + pieces[-1]]
    return pieces


def replay(body: bytes, route: Route, *, include_usage: bool) -> bytes:
    """The whole SSE stream, ending in `data: [DONE]`, for the stored answer `body`."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ReplayError("the stored answer is not JSON") from exc
    if not isinstance(answer, dict) or unknown_fields(answer, ANSWER_FIELDS):
        raise ReplayError("the stored answer has fields a stream cannot carry")
    choices = answer.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ReplayError("the stored answer has no list of choices")
    chat = route == "chat"
    template: dict[str, Any] = {
        "id": answer.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": answer.get("created"),
        "model": answer.get("model"),
    }
    if "system_fingerprint" in answer:
        template["system_fingerprint"] = answer["system_fingerprint"]
    template["choices"] = None
    if include_usage:
        template["usage"] = None
    # Every chunk is the template with its own choices: serialise the rest once. The marker
    # cannot occur inside a JSON string, where a quote is always escaped.
    head, _, tail = orjson.dumps(template).rpartition(b'"choices":null')
    head = b"data: " + head + b'"choices":'
    tail += b"\n\n"
    render = _chat_choice if chat else _text_choice
    out = [
        head + event + tail
        for position, choice in enumerate(choices)
        for event in render(choice, choice.get("index", position))
    ]
    usage = answer.get("usage")
    if include_usage and isinstance(usage, dict):
        out.append(b"data: " + orjson.dumps({**template, "choices": [], "usage": usage}) + b"\n\n")
    out.append(DONE_EVENT)
    return b"".join(out)


def _choices(event: dict[str, Any]) -> bytes:
    return orjson.dumps([event])


# A text piece's event, `[{"index":…,<text>,"logprobs":null,"finish_reason":null}]`, filled into
# a template: the same bytes as serialising the whole choice, at a fraction of the cost.
_PLAIN_CLOSE = b',"logprobs":null,"finish_reason":null}]'


def _chat_choice(choice: dict[str, Any], index: Any) -> Iterator[bytes]:
    message = choice.get("message")
    if unknown_fields(choice, CHAT_CHOICE_FIELDS) or not isinstance(message, dict):
        raise ReplayError("a stored choice has no message")
    if unknown_fields(message, MESSAGE_FIELDS):
        raise ReplayError("a stored message has fields a stream cannot carry")

    def chunk(delta: dict[str, Any], logprobs: Any = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}

    def deltas(name: str, pieces: list[Piece]) -> Iterator[bytes]:
        # `name` is one of ours: it needs no escaping.
        opening = b'[{"index":' + orjson.dumps(index) + b',"delta":{"' + name.encode() + b'":'
        for piece, logprobs in pieces:
            if logprobs is None:
                yield opening + orjson.dumps(piece) + b"}" + _PLAIN_CLOSE
            else:
                yield _choices(chunk({name: piece}, logprobs))

    yield _choices(chunk({"role": message.get("role") or "assistant", "content": ""}))
    for name in ("reasoning_content", "reasoning"):
        yield from deltas(name, _plain(message.get(name)))
    pieces, leftover = _pieces(_text(message.get("content")), choice.get("logprobs"), chat=True)
    yield from deltas("content", pieces)
    yield from deltas("refusal", _plain(message.get("refusal")))
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ReplayError("stored tool_calls are not a list")
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or unknown_fields(
            call, frozenset({"id", "type", "function", "index"})
        ):
            raise ReplayError("a stored tool call is malformed")
        first = {
            "index": number,
            "id": call.get("id"),
            "type": call.get("type") or "function",
            "function": {"name": _text(function.get("name")), "arguments": ""},
        }
        yield _choices(chunk({"tool_calls": [first]}))
        for piece in split_text(_text(function.get("arguments"))):
            call_delta = {"index": number, "function": {"arguments": piece}}
            yield _choices(chunk({"tool_calls": [call_delta]}))
    yield _choices(_finished(chunk({}, leftover), choice))


def _text_choice(choice: dict[str, Any], index: Any) -> Iterator[bytes]:
    if unknown_fields(choice, TEXT_CHOICE_FIELDS):
        raise ReplayError("a stored choice has fields a stream cannot carry")
    pieces, leftover = _pieces(_text(choice.get("text")), choice.get("logprobs"), chat=False)
    opening = b'[{"index":' + orjson.dumps(index) + b',"text":'
    for piece, logprobs in pieces:
        if logprobs is None:
            yield opening + orjson.dumps(piece) + _PLAIN_CLOSE
        else:
            event = {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": None}
            yield _choices(event)
    finish = {"index": index, "text": "", "logprobs": leftover, "finish_reason": None}
    yield _choices(_finished(finish, choice))


def _finished(chunk: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    chunk["finish_reason"] = choice.get("finish_reason")
    if "stop_reason" in choice:
        chunk["stop_reason"] = choice["stop_reason"]
    return chunk


def _plain(value: Any) -> list[Piece]:
    return [(piece, None) for piece in split_text(_text(value))]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ReplayError("a stored text field is not a string")
    return value


def _pieces(text: str, logprobs: Any, *, chat: bool) -> tuple[list[Piece], Any]:
    """The text's pieces with their logprobs, and any logprobs left for the finish chunk."""
    if logprobs is None:
        return [(piece, None) for piece in split_text(text)], None
    if not isinstance(logprobs, dict):
        raise ReplayError("stored logprobs are not an object")
    tokens = _tokens(logprobs, chat=chat)
    if tokens and "".join(tokens) == text:
        pieces: list[Piece] = []
        start = size = 0
        for end, token in enumerate(tokens, 1):
            size += len(token)
            if size >= TARGET_CHARS or end == len(tokens):
                part = {k: _slice(v, start, end) for k, v in logprobs.items()}
                pieces.append(("".join(tokens[start:end]), part))
                start, size = end, 0
        return pieces, None
    texts = split_text(text)
    if not texts:
        return [], logprobs
    # The tokens do not spell the text (byte-level tokens, say): keep them whole, on one chunk.
    return [(texts[0], logprobs), *((piece, None) for piece in texts[1:])], None


def _slice(value: Any, start: int, end: int) -> Any:
    return value[start:end] if isinstance(value, list) else None


def _tokens(logprobs: dict[str, Any], *, chat: bool) -> list[str] | None:
    """The token texts the logprobs lists run parallel to, when every list does."""
    if chat:
        entries = logprobs.get("content")
        others = [v for k, v in logprobs.items() if k != "content"]
        if not isinstance(entries, list) or any(v is not None for v in others):
            return None
        tokens = [e.get("token") if isinstance(e, dict) else None for e in entries]
    else:
        raw = logprobs.get("tokens")
        if not isinstance(raw, list):
            return None
        tokens = list(raw)
        for value in logprobs.values():
            if value is not None and (not isinstance(value, list) or len(value) != len(tokens)):
                return None
    strings = [token for token in tokens if isinstance(token, str)]
    return strings if len(strings) == len(tokens) else None
