"""SSE framing (`EventReader`) and the response that owns a relayed stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import DONE_EVENT, Event, EventReader, EventStreamResponse, data_event

# --- EventReader ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(
            b'data: {"a":1}\n\ndata: [DONE]\n\n',
            [Event(b'data: {"a":1}\n\n', b'{"a":1}'), Event(b"data: [DONE]\n\n", b"[DONE]")],
            id="lf",
        ),
        pytest.param(
            b"data: x\r\n\r\ndata: y\r\n\r\n",
            [Event(b"data: x\r\n\r\n", b"x"), Event(b"data: y\r\n\r\n", b"y")],
            id="crlf",
        ),
        pytest.param(
            b"data: x\r\rdata:y\r\r",
            [Event(b"data: x\r\r", b"x"), Event(b"data:y\r\r", b"y")],
            id="cr-and-no-space",
        ),
        pytest.param(
            b"data: one\ndata: two\n\n",
            [Event(b"data: one\ndata: two\n\n", b"one\ntwo")],
            id="multi-line-data",
        ),
        pytest.param(
            b": keep-alive\n\nevent: ping\nid: 7\n\n",
            [Event(b": keep-alive\n\n", None), Event(b"event: ping\nid: 7\n\n", None)],
            id="comment-and-other-fields",
        ),
        pytest.param(b"data\n\n", [Event(b"data\n\n", b"")], id="field-without-colon"),
        pytest.param(b"data: unfinished\n", [], id="incomplete"),
    ],
)
def test_events_are_framed_as_the_spec_says(stream: bytes, expected: list[Event]) -> None:
    assert EventReader().feed(stream) == expected


@pytest.mark.parametrize(
    "stream",
    [
        b'data: {"x": "a"}\n\ndata: {"x": "b"}\n\ndata: [DONE]\n\n',
        b"data: a\r\n\r\n: note\r\ndata: b\r\n\r\ndata: [DONE]\r\n\r\n",
        b"data: a\r\rdata: b\r\r",
    ],
)
def test_any_split_of_the_bytes_gives_the_same_events(stream: bytes) -> None:
    """Same data, and the raw bytes still add up to the stream (a CRLF split across pieces may
    hand its LF to the next event's raw bytes, which changes nothing on the wire)."""
    whole = [e.data for e in EventReader().feed(stream)]
    for cut in range(1, len(stream)):
        reader = EventReader()
        events = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [e.data for e in events] == whole, cut
        assert b"".join(e.raw for e in events) + reader.pending == stream, cut
    reader = EventReader()
    events = [e for i in range(len(stream)) for e in reader.feed(stream[i : i + 1])]
    assert [e.data for e in events] == whole
    assert b"".join(e.raw for e in events) + reader.pending == stream


def framed_line_by_line(stream: bytes) -> tuple[list[Event], bytes]:
    """The general framing (every line terminator), for comparison with the LF-only one."""
    reader = EventReader()
    reader._pending = stream
    events = []
    while (event := reader._next()) is not None:
        events.append(event)
    return events, reader.pending


LF_PIECES = [
    b"data: ",
    b"data:",
    b"data",
    b": c",
    b"id: 1",
    b"x",
    b"{}",
    b" ",
    b":",
    b"\n",
    b"\n\n",
]


@given(st.lists(st.sampled_from(LF_PIECES), max_size=30), st.integers(min_value=0, max_value=200))
def test_lf_only_streams_frame_as_the_general_reader_does(pieces: list[bytes], cut: int) -> None:
    stream = b"".join(pieces)
    reader = EventReader()
    events = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
    assert (events, reader.pending) == framed_line_by_line(stream)


def test_raw_bytes_of_events_add_up_to_the_stream() -> None:
    stream = b"data: a\n\n: c\n\ndata: b\r\n\r\ntail"
    reader = EventReader()
    events = reader.feed(stream)
    assert b"".join(e.raw for e in events) + reader.pending == stream


def test_data_event_frames_one_payload() -> None:
    assert data_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert DONE_EVENT == b"data: [DONE]\n\n"


# --- EventStreamResponse --------------------------------------------------------------------------


class Client:
    """The ASGI side of one client: records what was sent; disconnects on demand."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


class Upstream:
    """Stands for an engine stream: chunks on demand, and whether it was closed."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = 0
        self.generator_finished = False

    async def events(self) -> AsyncGenerator[bytes, None]:
        try:
            while (chunk := await self.chunks.get()) is not None:
                yield chunk
        finally:
            self.generator_finished = True

    async def close(self) -> None:
        self.closed += 1


async def test_response_streams_every_chunk_then_closes_the_upstream() -> None:
    client, upstream = Client(), Upstream()
    for chunk in (b"data: 1\n\n", b"data: 2\n\n", None):
        upstream.chunks.put_nowait(chunk)
    response = EventStreamResponse(
        upstream.events(), headers={"x-strata-cache": "miss"}, on_close=upstream.close
    )
    await response({"type": "http"}, client.receive, client.send)
    start = client.sent[0]
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"x-strata-cache", b"miss") in start["headers"]
    assert [m.get("more_body") for m in client.sent[1:]] == [True, True, False]
    assert client.body() == b"data: 1\n\ndata: 2\n\n"
    assert upstream.generator_finished
    assert upstream.closed == 1


async def test_disconnect_stops_a_waiting_body_and_closes_the_upstream() -> None:
    client, upstream = Client(), Upstream()
    upstream.chunks.put_nowait(b"data: 1\n\n")
    response = EventStreamResponse(upstream.events(), on_close=upstream.close)
    serving = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
    while len(client.sent) < 2:  # the start and the first chunk went out
        await asyncio.sleep(0)
    client.gone.set()  # the body now waits for a chunk that never comes
    await asyncio.wait_for(serving, 5)
    assert upstream.generator_finished
    assert upstream.closed == 1
    assert not any(m.get("more_body") is False for m in client.sent)


async def test_upstream_is_closed_even_when_the_body_never_started() -> None:
    client, upstream = Client(), Upstream()

    async def refuse(message: dict[str, Any]) -> None:
        raise OSError("client gone")  # ASGI 2.4 servers raise on send after a disconnect

    response = EventStreamResponse(upstream.events(), on_close=upstream.close)
    await response({"type": "http"}, client.receive, refuse)
    assert upstream.closed == 1
