"""A minimal HTTP/1.1 client for one engine: keep-alive connections on asyncio, nothing more.

Why not httpx: relaying a stream is one small read and one small write per token, and profiles of
the gateway relaying streams (py-spy, 32 concurrent streams) put ~55% of its CPU in httpx,
httpcore, h11 and anyio — a cancel scope and a sniffio lookup around every read, and a pool that
polls every pooled socket on every request — against ~12% for writing to the client. This client
does per read what a relay needs: wait for bytes, strip the chunk framing, hand them over.

Guarantees:
- One origin (`http://` or `https://`, host, port, an optional path prefix); at most
  `max_connections` connections open at once; a request waits up to the pool timeout for one.
- A body is read as the engine framed it — Content-Length, chunked, or up to the connection's
  close — and `receive` hands back everything that has arrived since the last call in one piece,
  so a relay forwards what is buffered in one write rather than one write per event.
- A connection goes back to the pool only once its response was read to the end, both sides keep
  it alive and nothing else arrived on it; every other way out — an error, a timeout,
  cancellation, `aclose` before the end — closes it, and the engine (vLLM) aborts the request.
- Every wait has its own timeout (`Timeouts`: connect, write, each wait for more of the response,
  pool). Failures are `EngineError`s naming what went wrong: no connection → `EngineUnavailable`
  (503), too slow → `EngineTimeout` (504), an answer that breaks off or is not HTTP/1.x →
  `EngineProtocolError` (502).
- A request on a reused connection that the engine closed before answering a byte (it timed the
  idle connection out just then) is sent once more, on a new connection; nothing else is retried.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from typing import cast
from urllib.parse import urlsplit

from engine.errors import EngineProtocolError, EngineTimeout, EngineUnavailable
from engine.transport import Timeouts

# Past this many unread bytes a connection stops reading until the consumer catches up.
HIGH_WATER = 256 * 1024
MAX_HEAD = 64 * 1024  # status line and headers
MAX_LINE = 4096  # a chunk-size or trailer line

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_BAD_VALUE = re.compile(r"[\r\n\0]")

# Body framings.
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)
# Where a chunked body is.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class _Stale(Exception):
    """The connection closed before a byte of the response arrived."""


class Connection(asyncio.Protocol):
    """One TCP connection: the bytes that arrived and are not yet taken, and a way to wait for
    more with a deadline. One timer per connection, re-armed only when it fires, serves every
    wait: arming one per read would cost a timer for each token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._pieces: list[bytes] = []
        self._size = 0
        self._paused = False  # reading, because nobody took the bytes
        self.closed = False  # the engine closed it, or it broke
        self._waiter: asyncio.Future[bool] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._pieces.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake(True)

    def eof_received(self) -> bool:
        self.closed = True
        self._wake(True)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake(True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # used by the pool and the response

    def usable(self) -> bool:
        """Idle and open, with nothing unasked-for in it."""
        transport = self.transport
        return not (self.closed or self._pieces or transport is None or transport.is_closing())

    def take(self) -> bytes:
        """Every byte that arrived and was not taken yet."""
        pieces = self._pieces
        if not pieces:
            return b""
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pieces = []
        self._size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def wait(self, seconds: float) -> None:
        """Until more bytes arrive or the connection closes; `EngineTimeout` after `seconds`."""
        if self._pieces or self.closed:
            return
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        self._deadline = loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(self._deadline, self._expire)
        try:
            arrived = await waiter
        finally:
            self._waiter = None
        if not arrived:
            raise EngineTimeout(f"the engine sent nothing for {seconds:g} s")

    async def write(self, data: bytes, seconds: float) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise _Stale
        transport.write(data)
        if self._drained is not None:
            try:
                async with asyncio.timeout(seconds):
                    await self._drained
            except TimeoutError:
                raise EngineTimeout(f"the engine took no request bytes for {seconds:g} s") from None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wake(self, arrived: bool) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(arrived)

    def _expire(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # nobody is waiting; the next wait arms the timer again
        # The loop may run a timer up to its clock resolution early.
        if self._loop.time() + 0.001 >= self._deadline:
            self._wake(False)
        else:
            self._timer = self._loop.call_at(self._deadline, self._expire)


def _broken(message: str) -> EngineProtocolError:
    return EngineProtocolError(f"the engine's response is broken: {message}")


def parse_head(head: bytes) -> tuple[bool, int, dict[str, str]]:
    """(HTTP/1.1?, status, headers with lower-case names) of a response head without its blank
    line. Repeated headers are joined with ", "."""
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise _broken(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise _broken(f"not a header line: {line[:80]!r}")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return match.group(1) == b"1", int(match.group(2)), headers


def framing(
    method: str, status: int, http11: bool, headers: dict[str, str]
) -> tuple[int, int, bool]:
    """(framing, Content-Length, keep-alive) of a response, as RFC 9112 section 6.3 says."""
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if http11 else "keep-alive" in tokens
    if method == "HEAD" or status in (204, 304):
        return _NONE, 0, keep_alive
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.rsplit(",", 1)[-1].strip().lower() == "chunked":
            return _CHUNKED, 0, keep_alive and "content-length" not in headers
        return _CLOSE, 0, False
    declared = headers.get("content-length")
    if declared is None:
        return _CLOSE, 0, False
    values = {value.strip() for value in declared.split(",")}
    length = values.pop() if len(values) == 1 else ""
    if not (length.isascii() and length.isdigit()):
        raise _broken(f"invalid Content-Length {declared!r}")
    return _LENGTH, int(length), keep_alive


class Response:
    """An engine response whose body is read as it arrives (`engine.transport.UpstreamResponse`)."""

    def __init__(
        self,
        pool: ConnectionPool,
        connection: Connection,
        method: str,
        head: tuple[bool, int, dict[str, str]],
        *,
        rest: bytes,
        read_timeout: float,
    ) -> None:
        http11, self.status, self.headers = head
        self._framing, self._remaining, self._keep_alive = framing(
            method, self.status, http11, self.headers
        )
        self._pool = pool
        self._connection: Connection | None = connection
        self._rest = rest
        self._read_timeout = read_timeout
        self._state = _SIZE
        self._done = False
        if self._framing == _NONE or (self._framing == _LENGTH and not self._remaining):
            self._finish()

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        data = await self.receive()
        if not data:
            raise StopAsyncIteration
        return data

    async def receive(self) -> bytes:
        try:
            while not self._done:
                connection = self._connection
                if connection is None:
                    raise _broken("the response was closed before its end")
                buffered = self._rest + connection.take()
                self._rest = b""
                data = self._decode(buffered) if buffered else b""
                if self._done:
                    self._finish()
                    return data
                if data:
                    return data
                if connection.closed:
                    if self._framing != _CLOSE:
                        raise _broken("the connection closed before the end of the body")
                    self._done = True
                    self._finish()
                    return b""
                await connection.wait(self._read_timeout)
            return b""
        except asyncio.CancelledError:
            # Cancelled while waiting, every byte taken so far decoded and handed out: the
            # stream can be read on, or closed, by its owner (`aclose`).
            raise
        except BaseException:
            self._discard()
            raise

    async def read(self) -> bytes:
        parts = []
        try:
            while data := await self.receive():
                parts.append(data)
        except asyncio.CancelledError:
            self._discard()  # a half-read whole body is of use to nobody
            raise
        return b"".join(parts)

    async def aclose(self) -> None:
        self._discard()

    def _decode(self, data: bytes) -> bytes:
        if self._framing == _CHUNKED:
            return self._dechunk(data)
        if self._framing == _LENGTH:
            if len(data) >= self._remaining:
                data, self._rest = data[: self._remaining], data[self._remaining :]
                self._done = True
            self._remaining -= len(data)
        return data

    def _dechunk(self, data: bytes) -> bytes:
        parts: list[bytes] = []
        position, end = 0, len(data)
        while position < end and not self._done:
            if self._state == _DATA:
                size = min(self._remaining, end - position)
                parts.append(data[position : position + size])
                position += size
                self._remaining -= size
                if not self._remaining:
                    self._state = _DATA_END
            elif self._state == _DATA_END:
                if end - position < 2:
                    break
                if data[position : position + 2] != b"\r\n":
                    raise _broken("a chunk does not end with CRLF")
                position += 2
                self._state = _SIZE
            else:  # a size line, or a trailer line after the last chunk
                eol = data.find(b"\r\n", position)
                if eol < 0:
                    if end - position > MAX_LINE:
                        raise _broken("a chunk-size or trailer line is too long")
                    break
                line = data[position:eol]
                position = eol + 2
                if self._state == _TRAILER:
                    self._done = not line
                    continue
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if _HEX.fullmatch(size_text) is None:
                    raise _broken(f"invalid chunk size {line[:40]!r}")
                self._remaining = int(size_text, 16)
                self._state = _DATA if self._remaining else _TRAILER
        self._rest = data[position:]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _finish(self) -> None:
        """The body is complete: the connection goes back to the pool if it can be reused."""
        self._done = True
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection, reusable=self._keep_alive and not self._rest)

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection, reusable=False)


class ConnectionPool:
    """Keep-alive connections to one engine (`engine.transport.Transport`)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeouts: Timeouts,
        max_connections: int = 512,
        headers: dict[str, str] | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http:// or https:// URL: {base_url!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        self.origin = f"{url.scheme}://{url.netloc.rpartition('@')[2]}"
        lines = {"host": url.netloc.rpartition("@")[2], **(headers or {})}
        if any(_BAD_VALUE.search(f"{name}{value}") for name, value in lines.items()):
            raise ValueError("header names and values must not contain CR, LF or NUL")
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in lines.items()).encode()
        self._timeouts = timeouts
        self._max = max_connections
        # The most recently used last: it is the warmest, and the oldest is the first the engine
        # times out (vLLM closes connections idle for 5 s).
        self._idle: deque[Connection] = deque()
        self._open = 0  # idle + in use + connecting
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(
        self, method: str, path: str, body: bytes | None = None, *, timeouts: Timeouts | None = None
    ) -> Response:
        timeouts = timeouts or self._timeouts
        length = b"" if body is None else b"content-length: %d\r\n" % len(body)
        message = b"".join(
            (f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode(), self._headers, length,
             b"\r\n", body or b"")
        )  # fmt: skip
        retried = False
        while True:
            connection, reused = await self._acquire(timeouts)
            try:
                return await self._exchange(connection, method, message, timeouts)
            except _Stale:
                self.release(connection, reusable=False)
                if not reused or retried:
                    raise EngineProtocolError(
                        "the engine closed the connection without answering"
                    ) from None
                retried = True
            except BaseException:
                self.release(connection, reusable=False)
                raise

    async def _exchange(
        self, connection: Connection, method: str, message: bytes, timeouts: Timeouts
    ) -> Response:
        await connection.write(message, timeouts.write)
        received = b""
        while True:
            received += connection.take()
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                head = parse_head(received[:end])
                received = received[end + 4 :]
                if head[1] == 101:
                    raise _broken("it switched protocols, which the gateway never asks for")
                if head[1] >= 200:
                    return Response(
                        self, connection, method, head, rest=received, read_timeout=timeouts.read
                    )
                continue  # 1xx: an interim answer, the real one follows
            if len(received) > MAX_HEAD:
                raise _broken(f"its head is larger than {MAX_HEAD} bytes")
            if connection.closed:
                if not received:
                    raise _Stale
                raise _broken("the connection closed in the middle of the response head")
            await connection.wait(timeouts.read)

    async def _acquire(self, timeouts: Timeouts) -> tuple[Connection, bool]:
        """A connection, and whether it served a request before."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            if self._closed:
                raise EngineUnavailable("the engine client is closed")
            while self._idle:
                connection = self._idle.pop()
                if connection.usable():
                    return connection, True
                connection.close()
                self._open -= 1
            if self._open < self._max:
                self._open += 1
                try:
                    return await self._connect(timeouts.connect), False
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            if deadline is None:
                deadline = loop.time() + timeouts.pool
            await self._wait_for_release(deadline, timeouts.pool)

    async def _wait_for_release(self, deadline: float, seconds: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but leaving all the same: pass the turn on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise EngineTimeout(
                    f"no connection to the engine came free within {seconds:g} s"
                ) from None
            raise

    async def _connect(self, seconds: float) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                _, protocol = await loop.create_connection(
                    lambda: Connection(loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise EngineUnavailable(
                f"the engine at {self.origin} did not accept a connection within {seconds:g} s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise EngineUnavailable(
                f"the engine at {self.origin} is unreachable ({reason})"
            ) from exc
        return protocol

    def release(self, connection: Connection, *, reusable: bool) -> None:
        """Take back a connection: to reuse it if `reusable` and it still can be, else closed."""
        if reusable and not self._closed and connection.usable():
            self._idle.append(connection)
        else:
            connection.close()
            self._open -= 1
        while self._idle and not self._idle[0].usable():  # closed by the engine while idle
            self._idle.popleft().close()
            self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close the idle connections now and every other one as it comes back."""
        self._closed = True
        idle, self._idle = self._idle, deque()
        for connection in idle:
            connection.close()
        self._open -= len(idle)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports finish closing
