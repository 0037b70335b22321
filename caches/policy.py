"""What may be looked up, what may be stored, and what the client asked for.

Guarantees (all pure functions, no I/O):
- only deterministic requests are cached by default: `temperature == 0`, or a `seed` given, with
  at most one choice (`n` absent or 1); whether the answer is streamed does not matter (the
  gateway reassembles streams and replays stored answers as streams);
- only complete successful answers are storable: HTTP 200, a JSON object with at least one choice,
  every choice finished with an allowed reason;
- `Cache-Control: no-cache` skips the lookup but still stores, `no-store` does neither,
  `max-age=N` accepts only entries at most N seconds old; `X-Strata-TTL: N` sets the stored TTL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ControlError(ValueError):
    """A cache-control request header is malformed. `header` names it for the error response."""

    def __init__(self, header: str, message: str) -> None:
        super().__init__(message)
        self.header = header


@dataclass(frozen=True, slots=True)
class CacheControl:
    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None
    ttl: int | None = None


NO_CONTROL = CacheControl()


@dataclass(frozen=True, slots=True)
class Decision:
    """`lookup`: read the cache first. `store`: write a storable answer. `reason`: why not."""

    lookup: bool
    store: bool
    reason: str = ""


def _non_negative_int(header: str, raw: str) -> int:
    raw = raw.strip()
    if not raw.isdigit() or not raw.isascii():
        raise ControlError(header, f"{header} needs a non-negative integer number of seconds")
    return int(raw)


def parse_cache_control(
    cache_control: str | None, ttl: str | None, *, max_ttl: int
) -> CacheControl:
    """Parse the request's `Cache-Control` and `X-Strata-TTL` headers."""
    if not cache_control and ttl is None:
        return NO_CONTROL
    no_cache = no_store = False
    max_age: int | None = None
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            max_age = _non_negative_int("Cache-Control", value.strip().strip('"'))
        # Other directives (e.g. only-if-cached, no-transform) are not ours to act on.
    ttl_seconds: int | None = None
    if ttl is not None:
        ttl_seconds = _non_negative_int("X-Strata-TTL", ttl)
        if not 1 <= ttl_seconds <= max_ttl:
            raise ControlError("X-Strata-TTL", f"X-Strata-TTL must be between 1 and {max_ttl}")
    return CacheControl(no_cache=no_cache, no_store=no_store, max_age=max_age, ttl=ttl_seconds)


def is_deterministic(body: Mapping[str, Any]) -> bool:
    """Would the engine give the same answer to the same body again?"""
    if body.get("seed") is not None:
        return True
    temperature = body.get("temperature")
    return temperature is not None and temperature == 0


def decide(body: Mapping[str, Any], control: CacheControl, *, enabled: bool = True) -> Decision:
    """Should this request read and/or write the exact cache?"""
    if not enabled:
        return Decision(lookup=False, store=False, reason="disabled")
    if control.no_store:
        return Decision(lookup=False, store=False, reason="no-store")
    n = body.get("n")
    if n is not None and n != 1:
        return Decision(lookup=False, store=False, reason="n>1")
    if not is_deterministic(body):
        return Decision(lookup=False, store=False, reason="nondeterministic")
    if control.no_cache:
        return Decision(lookup=False, store=True, reason="no-cache")
    return Decision(lookup=True, store=True)


def storable(status: int, payload: Any, finish_reasons: frozenset[str]) -> bool:
    """Is this engine answer complete and successful, so that replaying it is correct?"""
    if status != 200 or not isinstance(payload, dict):
        return False
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") not in finish_reasons:
            return False
    return True


def usage_tokens(payload: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens from an answer's `usage`, 0 where absent or malformed."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    # `type(...) is int`: JSON `true` is a Python bool, which isinstance() counts as an int.
    return (
        prompt if type(prompt) is int and prompt >= 0 else 0,
        completion if type(completion) is int and completion >= 0 else 0,
    )
