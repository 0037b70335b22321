"""A TCP proxy for fault injection: put it between the gateway and Redis or the engine, then make
the link slow, drop it, swallow its packets or reset it, while traffic flows.

Modes (`FaultProxy.mode`), applied to new and open connections alike:
- `pass`: bytes flow both ways (after `latency` seconds per chunk, if set);
- `blackhole`: connections are accepted and bytes read, but nothing is forwarded either way —
  a peer that stopped answering without closing anything (a dead host, a partition);
- `refuse`: new connections are closed at once; open ones are closed too — a stopped server;
- `reset`: every connection is reset (RST) — a crashed peer or a middlebox dropping state.
`drop_open()` closes the open connections without changing the mode. Every task is owned and
cancelled by `aclose()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Literal

Mode = Literal["pass", "blackhole", "refuse", "reset"]


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.latency = 0.0
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        if mode == "refuse":
            self.drop_open()
        elif mode == "reset":
            self.drop_open(reset=True)

    def drop_open(self, *, reset: bool = False) -> None:
        for client, upstream in list(self._links):
            for writer in (client, upstream):
                if writer is None:
                    continue
                if reset:
                    _reset(writer)
                writer.close()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.mode in ("refuse", "reset"):
                if self.mode == "reset":
                    _reset(writer)
                writer.close()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            link = (writer, up_writer)
            self._links.add(link)
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                self._links.discard(link)
                up_writer.close()
                writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode == "blackhole":
                    continue  # swallowed
                if self.latency:
                    await asyncio.sleep(self.latency)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.write_eof()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_open()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@contextlib.asynccontextmanager
async def fault_proxy(host: str, port: int) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(host, port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()
