"""The gateway's HTTP/1.1 client against raw asyncio servers (byte-exact answers, broken ones,
silent ones) and against the fake engine served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from engine import EngineClient, EngineProtocolError, EngineTimeout, EngineUnavailable, Timeouts
from engine.fake import FakeEngine
from engine.http11 import ConnectionPool
from tests.asgi_server import served

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
QUICK = Timeouts(connect=2, read=2, write=2, pool=2)


class RawServer:
    """A loopback TCP server running `handle` on each connection; counts them, and counts the
    ones the client closed (read EOF while the handler waited for a request)."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.connections = 0
        self.client_closed = 0
        self.eof = asyncio.Event()
        self.url = ""
        self._tasks: set[asyncio.Task[None]] = set()

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    async def wait_for_eof(self, reader: asyncio.StreamReader) -> None:
        """Until the client closes this connection."""
        while await reader.read(1024):
            pass
        self.client_closed += 1
        self.eof.set()


@contextlib.asynccontextmanager
async def raw_server(handle: Handler) -> AsyncIterator[RawServer]:
    server = RawServer(handle)
    listener = await asyncio.start_server(server._run, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        listener.close()
        for task in server._tasks:
            task.cancel()
        await asyncio.gather(*server._tasks)
        await listener.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def answer(body: bytes, *extra: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n" + b"".join(extra) + b"content-length: %d\r\n\r\n" % len(body) + body
    )


async def fetch(pool: ConnectionPool, path: str = "/x", body: bytes | None = b"{}") -> bytes:
    response = await pool.request("POST", path, body)
    try:
        return await response.read()
    finally:
        await response.aclose()


@contextlib.asynccontextmanager
async def pool_for(server: RawServer, **kw: object) -> AsyncIterator[ConnectionPool]:
    options: dict[str, object] = {"timeouts": QUICK, **kw}
    pool = ConnectionPool(server.url, **options)  # type: ignore[arg-type]
    try:
        yield pool
    finally:
        await pool.aclose()


async def test_content_length_answers_reuse_one_connection() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head + body)
            writer.write(answer(b"echo:" + body))

    async with raw_server(handle) as server, pool_for(server, headers={"x-key": "v"}) as pool:
        first = await fetch(pool, "/v1/a", b'{"n":1}')
        second = await fetch(pool, "/v1/b", b'{"n":2}')
    assert (first, second) == (b'echo:{"n":1}', b'echo:{"n":2}')
    assert server.connections == 1
    request_line, *lines = seen[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert request_line == b"POST /v1/a HTTP/1.1"
    assert {b"x-key: v", b"content-length: 7", b"host: " + server.url[7:].encode()} <= set(lines)


async def test_a_path_prefix_in_the_url_is_kept_and_get_sends_no_body() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        seen.append(head)
        writer.write(answer(b"ok"))

    async with raw_server(handle) as server:
        pool = ConnectionPool(server.url + "/engine/", timeouts=QUICK)
        try:
            assert await fetch(pool, "/health", None) == b"ok"
        finally:
            await pool.aclose()
    assert seen[0].startswith(b"POST /engine/health HTTP/1.1\r\n")
    assert b"content-length" not in seen[0]


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n"
    b"1;name=value\r\n \r\n"
    b"C\r\nworld, again\r\n"
    b"0\r\ntrailer: yes\r\n\r\n"
)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, len(CHUNKED)])
async def test_chunked_bodies_are_decoded_however_they_are_split(piece: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for start in range(0, len(CHUNKED), piece):
                writer.write(CHUNKED[start : start + piece])
                await writer.drain()
                await asyncio.sleep(0)

    async with raw_server(handle) as server, pool_for(server) as pool:
        response = await pool.request("POST", "/x", b"{}")
        pieces = [chunk async for chunk in response]
        await response.aclose()
        again = await fetch(pool)
    assert b"".join(pieces) == b"hello world, again"
    assert all(pieces)
    assert again == b"hello world, again"
    assert server.connections == 1  # the chunked body was read to its end: reused


async def test_receive_hands_over_everything_buffered_in_one_piece() -> None:
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"b\r\ndata: one\n\n\r\n"
            b"b\r\ndata: two\n\n\r\n"
        )
        await release.wait()
        writer.write(b"d\r\ndata: three\n\n\r\n0\r\n\r\n")
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server, pool_for(server) as pool:
        response = await pool.request("POST", "/x", b"{}")
        first = await response.receive()
        release.set()
        second = await response.receive()
        end = await response.receive()
        await response.aclose()
    assert first == b"data: one\n\ndata: two\n\n"
    assert (second, end) == (b"data: three\n\n", b"")


async def test_a_body_delimited_by_close_is_read_and_its_connection_not_reused() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")

    async with raw_server(handle) as server, pool_for(server) as pool:
        first = await fetch(pool)
        second = await fetch(pool)
    assert first == second == b"until the end"
    assert server.connections == 2


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"connection: close\r\n", id="connection-close"),
        pytest.param(b"x: y\r\n", id="bytes-after-the-body"),
    ],
)
async def test_connections_that_cannot_be_kept_are_not_reused(extra: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        trailing = b"" if b"close" in extra else b"unexpected"
        writer.write(answer(b"ok", extra) + trailing)
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server, pool_for(server) as pool:
        assert await fetch(pool) == b"ok"
        assert await fetch(pool) == b"ok"
        await asyncio.wait_for(server.eof.wait(), 5)
    assert server.connections == 2


async def test_interim_answers_are_skipped() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"final"))

    async with raw_server(handle) as server, pool_for(server) as pool:
        assert await fetch(pool) == b"final"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        pytest.param(b"garbage\r\n\r\n", "not an HTTP/1.x status line", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "not a header line", id="header"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n", "invalid Content-Length", id="cl"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
            "invalid Content-Length",
            id="two-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "invalid chunk size",
            id="chunk-size",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXY",
            "does not end with CRLF",
            id="chunk-end",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            "closed before the end of the body",
            id="short-body",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            "closed before the end of the body",
            id="short-chunk",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-", "in the middle of the response head", id="short-head"
        ),
        pytest.param(b"", "closed the connection without answering", id="no-answer"),
        pytest.param(b"HTTP/1.1 101 Switching\r\n\r\n", "switched protocols", id="upgrade"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * 12000, "head is larger", id="huge"),
    ],
)
async def test_broken_answers_are_clear_protocol_errors(reply: bytes, message: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with raw_server(handle) as server, pool_for(server) as pool:
        with pytest.raises(EngineProtocolError, match=message) as caught:
            await fetch(pool)
    assert caught.value.status == 502


async def test_an_engine_that_never_answers_times_out_and_loses_the_connection() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server:
        timeouts = Timeouts(connect=2, read=0.2, write=2, pool=2)
        async with pool_for(server, timeouts=timeouts) as pool:
            with pytest.raises(EngineTimeout) as caught:
                await fetch(pool)
            await asyncio.wait_for(server.eof.wait(), 5)
    assert caught.value.status == 504


async def test_a_stream_that_stalls_times_out_per_read() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(8):  # 8 x 0.1 s: longer than the read timeout, but no gap is
            writer.write(b"1\r\n.\r\n")
            await asyncio.sleep(0.1)
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server:
        timeouts = Timeouts(connect=2, read=0.5, write=2, pool=2)
        async with pool_for(server, timeouts=timeouts) as pool:
            response = await pool.request("POST", "/x", b"{}")
            received = b""
            while len(received) < 8:
                received += await response.receive()
            with pytest.raises(EngineTimeout, match=r"sent nothing for 0\.5 s"):
                await response.receive()
            await response.aclose()
            await asyncio.wait_for(server.eof.wait(), 5)
    assert received == b"." * 8


async def test_an_engine_that_is_not_listening_is_unavailable() -> None:
    async with raw_server(read_request) as server:  # type: ignore[arg-type]
        url = server.url
    pool = ConnectionPool(url, timeouts=QUICK)
    try:
        with pytest.raises(EngineUnavailable, match="is unreachable") as caught:
            await fetch(pool)
    finally:
        await pool.aclose()
    assert caught.value.status == 503


async def test_closing_a_response_early_closes_its_connection() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server, pool_for(server) as pool:
        response = await pool.request("POST", "/x", b"{}")
        assert await response.receive() == b"abc"
        await response.aclose()
        await asyncio.wait_for(server.eof.wait(), 5)
        await response.aclose()  # twice is fine
    assert server.client_closed == 1


async def test_cancelling_a_reader_closes_its_connection() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server, pool_for(server) as pool:
        response = await pool.request("POST", "/x", b"{}")
        reading = asyncio.create_task(response.read())
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        await asyncio.wait_for(server.eof.wait(), 5)


async def test_a_stream_reader_cancelled_while_waiting_can_read_on() -> None:
    go_on = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
        await go_on.wait()
        writer.write(b"3\r\ntwo\r\n0\r\n\r\n")

    async with raw_server(handle) as server, pool_for(server) as pool:
        response = await pool.request("POST", "/x", b"{}")
        assert await response.receive() == b"one"
        waiting = asyncio.create_task(response.receive())
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        go_on.set()
        assert await response.read() == b"two"  # its owner (a background reader) reads on
        await response.aclose()


async def test_a_full_pool_waits_for_a_connection_then_reuses_it() -> None:
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfir")
        await release.wait()
        writer.write(b"st")
        await read_request(reader)
        writer.write(answer(b"second"))

    async with raw_server(handle) as server, pool_for(server, max_connections=1) as pool:
        first = await pool.request("POST", "/x", b"{}")
        second = asyncio.create_task(fetch(pool))
        await asyncio.sleep(0.05)
        assert not second.done()  # no connection is free
        release.set()
        assert await first.read() == b"first"
        assert await asyncio.wait_for(second, 5) == b"second"
        await first.aclose()
    assert server.connections == 1


async def test_a_full_pool_times_out() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server:
        timeouts = Timeouts(connect=2, read=2, write=2, pool=0.1)
        async with pool_for(server, timeouts=timeouts, max_connections=1) as pool:
            held = await pool.request("POST", "/x", b"{}")
            with pytest.raises(EngineTimeout, match="no connection to the engine came free"):
                await fetch(pool)
            await held.aclose()
            # The slot came back when the held response was closed.
            assert pool._open == 0


async def test_a_kept_alive_connection_closed_under_a_request_is_retried_once() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"fresh"))
        await read_request(reader)  # the second request on this connection: drop it unanswered

    async with raw_server(handle) as server, pool_for(server) as pool:
        assert await fetch(pool) == b"fresh"
        assert await fetch(pool) == b"fresh"  # retried on a new connection
    assert server.connections == 2


async def test_an_idle_connection_the_engine_closed_is_replaced() -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()
        if server.connections == 1:
            writer.close()  # a keep-alive timeout: the engine drops the idle connection
            closed.set()
            return
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server, pool_for(server, max_connections=1) as pool:
        assert await fetch(pool) == b"ok"
        await asyncio.wait_for(closed.wait(), 5)
        await asyncio.sleep(0.05)  # the close reaches the client
        assert await fetch(pool) == b"ok"
    assert server.connections == 2


async def test_closing_the_pool_closes_idle_connections_and_refuses_requests() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok"))
        await server.wait_for_eof(reader)

    async with raw_server(handle) as server:
        pool = ConnectionPool(server.url, timeouts=QUICK)
        assert await fetch(pool) == b"ok"
        await pool.aclose()
        await asyncio.wait_for(server.eof.wait(), 5)
        with pytest.raises(EngineUnavailable, match="closed"):
            await fetch(pool)


def test_urls_and_headers_are_checked() -> None:
    with pytest.raises(ValueError, match="http"):
        ConnectionPool("ftp://engine", timeouts=QUICK)
    with pytest.raises(ValueError, match="CR, LF"):
        ConnectionPool("http://engine", timeouts=QUICK, headers={"x": "a\r\nb: c"})


# --------------------------------------------------------------------- the fake engine, on TCP


async def test_engine_client_against_the_fake_engine_over_tcp() -> None:
    fake = FakeEngine(model="strata-fake", answer_bytes=300)
    body = {"model": "strata-fake", "messages": [{"role": "user", "content": "hi"}]}
    async with served(fake) as url:
        client = EngineClient(url, read_timeout=5)
        try:
            whole = await client.post("/v1/chat/completions", orjson.dumps(body))
            stream = await client.open_stream(
                "/v1/chat/completions", orjson.dumps({**body, "stream": True})
            )
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"
            events = await stream.read()
            await stream.aclose()
            missing = await client.post(
                "/v1/chat/completions", orjson.dumps({**body, "model": "x"})
            )
            healthy = await client.healthy()
        finally:
            await client.aclose()
    assert whole.status == 200
    assert whole.content_type == "application/json"
    assert orjson.loads(whole.body)["choices"][0]["message"]["content"]
    assert events.endswith(b"data: [DONE]\n\n")
    assert events.count(b"\n\n") > 10
    assert missing.status == 404
    assert healthy
    assert fake.completed_streams == 1


async def test_closing_a_stream_early_makes_the_fake_engine_stop() -> None:
    fake = FakeEngine(model="strata-fake", answer_bytes=4000, chunk_delay=0.01)
    body = {"model": "strata-fake", "prompt": "hi", "stream": True}
    async with served(fake) as url:
        client = EngineClient(url, read_timeout=5)
        try:
            stream = await client.open_stream("/v1/completions", orjson.dumps(body))
            assert await stream.receive()
            await stream.aclose()
            async with asyncio.timeout(5):
                while fake.cancelled == 0:
                    await asyncio.sleep(0.01)
        finally:
            await client.aclose()
    assert fake.completed_streams == 0
