"""A streamed completion, reassembled into the body a non-streaming request would have received.

Guarantees: fed the `data` of every event of an OpenAI-compatible stream (`chat.completion.chunk`
or `text_completion` chunks, then `[DONE]`), `result()` is one `chat.completion` or
`text_completion` object shaped like the non-streaming answer: the stream's id, created, model and
system_fingerprint; its choices by index, each with the concatenated content (reasoning and refusal
too), tool calls with their arguments concatenated by index, logprobs lists concatenated, finish
and stop reasons; and the usage when the stream carried it. `result()` is `None` unless the stream
is complete — `[DONE]` seen, no error event, at least one choice and every choice finished — and
faithful: a field it does not know how to reassemble (anything unknown that is not null or empty)
or a malformed chunk makes the answer unstorable rather than stored without it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.sse import DONE

Route = Literal["chat", "completions"]
# What one event was. `finish`: a chunk that finishes a choice; `usage`: the usage-only chunk.
EventKind = Literal["chunk", "finish", "usage", "done", "error", "invalid"]

CHUNK_FIELDS = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"}
)
CHAT_CHOICE_FIELDS = frozenset({"index", "delta", "logprobs", "finish_reason", "stop_reason"})
TEXT_CHOICE_FIELDS = frozenset({"index", "text", "logprobs", "finish_reason", "stop_reason"})
# Delta fields streamed as text pieces; `reasoning_content` (vLLM) and `reasoning` (newer vLLM).
TEXT_DELTAS = ("content", "reasoning_content", "reasoning", "refusal")
TEXT_DELTA_FIELDS = frozenset(TEXT_DELTAS)


def is_empty(value: Any) -> bool:
    """Null, or an empty list or object: a field that says nothing and can be dropped."""
    return value is None or (isinstance(value, list | dict) and not value)


def unknown_fields(obj: dict[str, Any], known: frozenset[str]) -> bool:
    return any(name not in known and not is_empty(value) for name, value in obj.items())


@dataclass(slots=True)
class ToolCallParts:
    id: str | None = None
    type: str | None = None
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)

    def render(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type or "function",
            "function": {"name": "".join(self.name), "arguments": "".join(self.arguments)},
        }


@dataclass(slots=True)
class ChoiceParts:
    index: int
    role: str | None = None
    texts: dict[str, list[str]] = field(default_factory=dict)
    tool_calls: dict[int, ToolCallParts] = field(default_factory=dict)
    logprobs: dict[str, list[Any] | None] | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    has_stop_reason: bool = False


class StreamAssembler:
    def __init__(self, route: Route) -> None:
        self.route = route
        self.done = False
        self.failed = False  # an error event, or something this module cannot reassemble
        self._head: dict[str, Any] = {}
        self._fingerprint: Any = None
        self._usage: dict[str, Any] | None = None
        self._choices: dict[int, ChoiceParts] = {}

    def feed(self, data: bytes) -> EventKind:
        """Take one event's data; say what it was."""
        if self.done:
            return "invalid"
        if len(data) < 16 and data.strip() == DONE:
            self.done = True
            return "done"
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.failed = True
            return "invalid"
        if not isinstance(chunk, dict):
            self.failed = True
            return "invalid"
        if "error" in chunk:
            self.failed = True
            return "error"
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not self._take(chunk):
            self.failed = True
            return "invalid"
        if not choices and isinstance(chunk.get("usage"), dict):
            return "usage"
        for choice in choices:
            if choice.get("finish_reason") is not None:
                return "finish"
        return "chunk"

    def _take(self, chunk: dict[str, Any]) -> bool:
        # `keys() <= known` is one C call; the field-by-field look only when it fails.
        if not chunk.keys() <= CHUNK_FIELDS and unknown_fields(chunk, CHUNK_FIELDS):
            return False
        if not self._head:
            self._head = {k: chunk.get(k) for k in ("id", "created", "model")}
        if chunk.get("system_fingerprint") is not None:
            self._fingerprint = chunk["system_fingerprint"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        elif usage is not None:
            return False
        return all(self._take_choice(choice) for choice in chunk["choices"])

    def _take_choice(self, choice: Any) -> bool:
        if not isinstance(choice, dict) or type(choice.get("index")) is not int:
            return False
        chat = self.route == "chat"
        known = CHAT_CHOICE_FIELDS if chat else TEXT_CHOICE_FIELDS
        if not choice.keys() <= known and unknown_fields(choice, known):
            return False
        parts = self._choices.get(choice["index"])
        if parts is None:
            parts = self._choices[choice["index"]] = ChoiceParts(choice["index"])
        if chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict) or not _take_delta(parts, delta):
                return False
        elif not _take_text(parts, "text", choice.get("text")):
            return False
        if not _take_logprobs(parts, choice.get("logprobs")):
            return False
        if choice.get("finish_reason") is not None:
            parts.finish_reason = choice["finish_reason"]
        if "stop_reason" in choice:
            parts.has_stop_reason = True
            if choice["stop_reason"] is not None:
                parts.stop_reason = choice["stop_reason"]
        return True

    def result(self) -> dict[str, Any] | None:
        """The whole answer, or `None` when the stream was not complete and faithful."""
        if not self.done or self.failed or not self._choices:
            return None
        if any(parts.finish_reason is None for parts in self._choices.values()):
            return None
        chat = self.route == "chat"
        body: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
        }
        if self._fingerprint is not None:
            body["system_fingerprint"] = self._fingerprint
        render = _chat_choice if chat else _text_choice
        body["choices"] = [render(self._choices[i]) for i in sorted(self._choices)]
        if self._usage is not None:
            body["usage"] = self._usage
        return body


def _take_text(parts: ChoiceParts, name: str, value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    texts = parts.texts.get(name)
    if texts is None:
        parts.texts[name] = [value]
    else:
        texts.append(value)
    return True


def _take_delta(parts: ChoiceParts, delta: dict[str, Any]) -> bool:
    """One pass over the delta's fields: text pieces, the role, tool calls; anything else must
    be null or empty."""
    for name, value in delta.items():
        if value is None:
            continue
        if name in TEXT_DELTA_FIELDS:
            if not _take_text(parts, name, value):
                return False
        elif name == "role":
            if not isinstance(value, str):
                return False
            parts.role = value
        elif name == "tool_calls":
            if not isinstance(value, list):
                return False
            for call in value:
                if not _take_tool_call(parts, call):
                    return False
        elif not is_empty(value):
            return False
    return True


def _take_tool_call(parts: ChoiceParts, call: Any) -> bool:
    if not isinstance(call, dict) or type(call.get("index")) is not int:
        return False
    if unknown_fields(call, frozenset({"index", "id", "type", "function"})):
        return False
    target = parts.tool_calls.setdefault(call["index"], ToolCallParts())
    for name in ("id", "type"):
        value = call.get(name)
        if value is not None:
            if not isinstance(value, str):
                return False
            setattr(target, name, getattr(target, name) or value)
    function = call.get("function")
    if function is None:
        return True
    if not isinstance(function, dict) or unknown_fields(function, frozenset({"name", "arguments"})):
        return False
    for name in ("name", "arguments"):
        value = function.get(name)
        if value is not None:
            if not isinstance(value, str):
                return False
            getattr(target, name).append(value)
    return True


def _take_logprobs(parts: ChoiceParts, logprobs: Any) -> bool:
    """Logprobs arrive as objects of parallel lists (`content` for chat; `tokens`,
    `token_logprobs`, `top_logprobs`, `text_offset` for completions): concatenate each list."""
    if logprobs is None:
        return True
    if not isinstance(logprobs, dict):
        return False
    merged = parts.logprobs if parts.logprobs is not None else {}
    for name, value in logprobs.items():
        if isinstance(value, list):
            existing = merged.get(name)
            if existing is None:
                merged[name] = list(value)
            else:
                existing.extend(value)
        elif value is None:
            merged.setdefault(name, None)
        else:
            return False
    parts.logprobs = merged
    return True


def _chat_choice(parts: ChoiceParts) -> dict[str, Any]:
    content = "".join(parts.texts.get("content", ()))
    message: dict[str, Any] = {
        "role": parts.role or "assistant",
        # The first chunk carries `content: ""` even before tool calls, whose answer has null.
        "content": content or (None if parts.tool_calls else ""),
    }
    for name in TEXT_DELTAS[1:]:
        if name in parts.texts:
            message[name] = "".join(parts.texts[name])
    if parts.tool_calls:
        message["tool_calls"] = [parts.tool_calls[i].render() for i in sorted(parts.tool_calls)]
    return _finish(parts, {"index": parts.index, "message": message})


def _text_choice(parts: ChoiceParts) -> dict[str, Any]:
    return _finish(parts, {"index": parts.index, "text": "".join(parts.texts.get("text", ()))})


def _finish(parts: ChoiceParts, choice: dict[str, Any]) -> dict[str, Any]:
    choice["logprobs"] = parts.logprobs
    choice["finish_reason"] = parts.finish_reason
    if parts.has_stop_reason:
        choice["stop_reason"] = parts.stop_reason
    return choice
