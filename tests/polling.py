"""Waiting for something another task, process or replica does, without sleeping blindly."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def eventually(
    check: Callable[[], object | Awaitable[object]],
    timeout: float = 2.0,
    every: float = 0.005,
) -> float:
    """Seconds until `check()` (a plain or async function) was true; AssertionError past
    `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return loop.time() - started
        if loop.time() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(every)
