"""What a cacheable stream's relay forwards, and when, while it reassembles the answer.

Guarantees: `StreamTee.feed` takes the engine's bytes as they arrive and hands back, at once, every
event completed so far exactly as the engine sent it — except, when the gateway asked for usage the
client did not want (`hide_usage`), the usage chunk. vLLM moves `system_fingerprint` from the
finish chunk onto that usage chunk when usage is on; so with `hide_usage` a finish chunk is held
until the next event and, if that is the hidden usage chunk, receives its fingerprint: the client
sees what it would have seen had it streamed straight from the engine. `[DONE]` (and anything after
it) is handed back separately, so the caller can store the answer before the client learns the
stream is over. `answer()` is the reassembled answer once the stream is complete
(`gateway.assembly`).

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.assembly import Route, StreamAssembler
from gateway.sse import Event, EventReader, data_event


class StreamTee:
    def __init__(self, route: Route, *, hide_usage: bool) -> None:
        self._reader = EventReader()
        self._assembler = StreamAssembler(route)
        self._hide_usage = hide_usage
        self._held: Event | None = None  # a finish chunk, waiting for the next event

    @property
    def done(self) -> bool:
        """`[DONE]` was seen."""
        return self._assembler.done

    def answer(self) -> dict[str, Any] | None:
        return self._assembler.result()

    def feed(self, chunk: bytes) -> tuple[bytes, bytes]:
        """(bytes to forward now, bytes to forward once the answer is stored — `[DONE]` on)."""
        if self.done:
            return chunk, b""
        now: list[bytes] = []
        after: list[bytes] = []
        for event in self._reader.feed(chunk):
            if self.done:
                after.append(event.raw)
                continue
            kind = "chunk" if event.data is None else self._assembler.feed(event.data)
            if self._hide_usage:
                if kind == "usage":
                    if self._held is not None:
                        now.append(_stamped(self._held, event))
                        self._held = None
                    continue  # we asked for it, the client did not
                now.append(self.flush())
                if kind == "finish":
                    self._held = event
                    continue
            (after if kind == "done" else now).append(event.raw)
        if self.done:
            after.append(self._reader.pending)
        return b"".join(now), b"".join(after)

    def flush(self) -> bytes:
        """A held finish chunk, for when no usage chunk is coming (the stream broke off)."""
        held, self._held = self._held, None
        return held.raw if held is not None else b""


def _stamped(finish: Event, usage: Event) -> bytes:
    """The finish chunk, with the fingerprint the engine put on the usage chunk instead."""
    try:
        fingerprint = orjson.loads(usage.data or b"{}").get("system_fingerprint")
        chunk = orjson.loads(finish.data or b"{}")
    except orjson.JSONDecodeError:
        return finish.raw
    if fingerprint is None or not isinstance(chunk, dict) or chunk.get("system_fingerprint"):
        return finish.raw
    return data_event(orjson.dumps({**chunk, "system_fingerprint": fingerprint}))
