"""`strata warm FILE.jsonl`: fill a running gateway's cache before the traffic comes.

Each line of the file is one JSON object, either
- a completion request (`{"model", "messages"}` for chat, `{"model", "prompt"}` for completions;
  `"route"` may name it): sent through the gateway's own route with the tenant's API key, so it is
  keyed, decided and stored exactly as real traffic is (`stream` and `stream_options` are dropped:
  they are not part of the key, and a whole answer is simpler to judge); or
- an entry `{"request": {...}, "response": "answer text" | completion object}` (see
  `gateway.entries`): stored as the answer to that request through `POST /admin/cache/entries`,
  without asking the engine.

Guarantees: at most `concurrency` requests are in flight and each has a timeout; every line ends
as exactly one of stored (a cacheable miss with a complete answer, or an entry the gateway
stored), skipped (already cached, a repeat of an earlier line, or not cacheable: with the reason
the gateway gave) or failed (not a JSON object, an HTTP error, no answer in time: with the line
number and the message); a bad line never stops the run. Progress goes to `err`: a redrawn bar
(at most ten times a second) on a terminal, otherwise a line every tenth of the way.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
import orjson

from config.settings import FINISH_REASONS
from gateway.entries import route_of
from gateway.errors import APIError
from gateway.remote import Target

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
FILL_PATH = "/admin/cache/entries"
DROPPED_FIELDS = ("route", "stream", "stream_options")
SHOWN_FAILURES = 5
BAR_WIDTH = 30

Result = Literal["stored", "skipped", "failed"]


@dataclass(frozen=True, slots=True)
class Job:
    """One line to send: a request through its route, or an entry to fill."""

    line: int
    path: str
    body: dict[str, Any]
    fill: bool


@dataclass(slots=True)
class WarmReport:
    lines: int = 0
    stored: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.stored + self.skipped.total() + len(self.failures)

    def add(self, line: int, result: Result, detail: str = "") -> None:
        if result == "stored":
            self.stored += 1
        elif result == "skipped":
            self.skipped[detail] += 1
        else:
            self.failures.append((line, detail))

    def counts(self) -> str:
        return f"stored {self.stored} skipped {self.skipped.total()} failed {len(self.failures)}"

    def render(self) -> str:
        out = [
            f"{self.stored} stored, {self.skipped.total()} skipped, {len(self.failures)} failed "
            f"({self.lines} lines)"
        ]
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            out.append(f"skipped: {reasons}")
        failures = sorted(self.failures)
        for line, message in failures[:SHOWN_FAILURES]:
            out.append(f"failed: line {line}: {message}")
        if len(failures) > SHOWN_FAILURES:
            out.append(f"failed: ... and {len(failures) - SHOWN_FAILURES} more")
        return "\n".join(out)


def parse_line(number: int, text: str) -> Job:
    """The job on one line; `ValueError` with the reason when there is none."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    try:
        if "request" in obj and "response" in obj:
            request = obj["request"]
            if not isinstance(request, dict):
                raise ValueError("`request` is not an object")
            route_of(request, obj.get("route"))
            return Job(number, FILL_PATH, obj, fill=True)
        route = route_of(obj, obj.get("route"))
    except APIError as exc:
        raise ValueError(exc.message) from None
    body = {name: value for name, value in obj.items() if name not in DROPPED_FIELDS}
    return Job(number, PATHS[route], body, fill=False)


def _identity(job: Job) -> bytes:
    return hashlib.sha256(orjson.dumps([job.path, job.body], option=orjson.OPT_SORT_KEYS)).digest()


def error_message(response: httpx.Response) -> str:
    """`HTTP status: the gateway's own message`."""
    try:
        message = orjson.loads(response.content)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


def judge(job: Job, response: httpx.Response) -> tuple[Result, str]:
    """What became of one line, from the gateway's answer."""
    if response.status_code >= 400:
        return "failed", error_message(response)
    if job.fill:
        return "stored", ""
    cache = response.headers.get("x-strata-cache", "")
    reason = response.headers.get("x-strata-cache-reason")
    if cache == "hit":
        return "skipped", "already cached"
    if cache == "coalesced":
        return "skipped", "being cached by another request"
    if cache != "miss" or reason:
        return "skipped", f"not cacheable ({reason or cache or 'no X-Strata-Cache'})"
    try:
        choices = orjson.loads(response.content)["choices"]
        complete = all(choice["finish_reason"] in FINISH_REASONS for choice in choices)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        complete = False
    return ("stored", "") if complete else ("skipped", "incomplete answer, not stored")


class Progress:
    """Where the run is, on `stream`: a bar redrawn in place on a terminal (at most every
    `interval` seconds), otherwise a line at every tenth of the way."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        tty: bool | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval
        self.clock = clock
        self._drawn = float("-inf")
        self._tenth = 0
        self._printed = 0

    def update(self, report: WarmReport, *, final: bool = False) -> None:
        done = report.done
        if self.tty:
            now = self.clock()
            if not final and now - self._drawn < self.interval:
                return
            self._drawn = now
            filled = BAR_WIDTH * min(done, self.total) // self.total
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            end = "\n" if final else ""
            self.stream.write(f"\r[{bar}] {done}/{self.total} {report.counts()}{end}")
        else:
            tenth = 10 * done // self.total
            if (done == self._printed) if final else (tenth <= self._tenth):
                return
            self._tenth, self._printed = tenth, done
            self.stream.write(f"{done}/{self.total} {report.counts()}\n")
        self.stream.flush()


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, text in enumerate(file, start=1):
            if text.strip():
                yield number, text


def count_lines(path: Path) -> int:
    return sum(1 for _ in _lines(path))


async def warm(
    path: Path,
    target: Target,
    *,
    concurrency: int = 8,
    request_timeout: float = 120.0,
    dry_run: bool = False,
    progress: Progress | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> WarmReport:
    """Send every line of `path` to the gateway at `target`; what became of each."""
    report = WarmReport()
    seen: set[bytes] = set()
    request_headers = {"content-type": "application/json", **target.headers(admin=False)}
    fill_headers = dict(request_headers)
    if target.admin_key:
        fill_headers["x-strata-admin-key"] = target.admin_key
    lines = _lines(path)

    def next_job() -> Job | None:
        """The next line to send; the lines in between that need no request are judged here."""
        for number, text in lines:
            report.lines += 1
            try:
                job = parse_line(number, text)
            except ValueError as exc:
                report.add(number, "failed", str(exc))
                continue
            identity = _identity(job)
            if identity in seen:
                report.add(number, "skipped", "repeats an earlier line")
                continue
            seen.add(identity)
            if dry_run:
                report.add(number, "skipped", "dry run: entry" if job.fill else "dry run: request")
                continue
            return job
        return None

    async def send(client: httpx.AsyncClient, job: Job) -> tuple[Result, str]:
        headers = fill_headers if job.fill else request_headers
        try:
            response = await client.post(job.path, content=orjson.dumps(job.body), headers=headers)
        except httpx.TimeoutException:
            return "failed", f"no answer within {request_timeout:g} s"
        except httpx.HTTPError as exc:
            return "failed", f"cannot reach the gateway at {target.url}: {exc}"
        return judge(job, response)

    async def worker(client: httpx.AsyncClient) -> None:
        while (job := next_job()) is not None:
            result, detail = await send(client, job)
            report.add(job.line, result, detail)
            if progress is not None:
                progress.update(report)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=target.url, timeout=request_timeout, limits=limits, transport=transport
    ) as client:
        # `next_job` runs without awaiting, so the workers never read the file at the same time.
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    if progress is not None:
        progress.update(report, final=True)
    return report


def run(
    path: Path,
    target: Target,
    *,
    concurrency: int,
    timeout: float,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """The command: warm, print the report; 0 when no line failed, else 1."""
    progress = Progress(count_lines(path), err)
    report = asyncio.run(
        warm(path, target, concurrency=concurrency, request_timeout=timeout, dry_run=dry_run,
             progress=progress)
    )  # fmt: skip
    print(report.render(), file=out)
    return 1 if report.failures else 0
