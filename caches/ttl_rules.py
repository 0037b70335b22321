"""How long a stored answer lives: the operator's TTL rules.

Guarantees (pure, no I/O): rules are tried in order and the first whose every given condition
holds decides the TTL; with none matching, the default TTL. A rule can test the request's model
(exact, or a glob such as `llama-3*`), the tenant, a regex searched in the text of the last user
message (chat) or the prompt (completions), and a request header (present, or its value searched
with a regex). Patterns are compiled once, when the rules are built; the cheap conditions (model,
tenant, header) are tested before the text pattern, and the text is only extracted for a rule
that gets that far.

Regex cost is bounded by what is searched: only the last user message (or the prompt), never the
whole conversation, and that text is already limited to `max_content_chars` by the request checks
that run before any rule. Python's `re` can still backtrack badly on a pathological pattern, so keep
patterns simple (anchored or literal alternatives); they are the operator's, never the client's.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GLOB_CHARS = frozenset("*?[")


def _compile(what: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {exc}") from None


@dataclass(frozen=True, slots=True)
class TTLRule:
    """One rule: `ttl` seconds for requests that meet all of its given conditions.

    `model`: the request's model, exactly or as a glob. `tenant`: the resolved tenant name.
    `pattern`: regex searched in the last user message or the prompt. `header`: a request header
    that must be present; with `header_value`, a regex its value must contain a match of.
    """

    name: str
    ttl: int
    model: str | None = None
    tenant: str | None = None
    pattern: str | None = None
    header: str | None = None
    header_value: str | None = None
    _model: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _header_value: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a TTL rule needs a name")
        if self.ttl < 1:
            raise ValueError(f"TTL rule {self.name!r}: ttl must be at least 1 second")
        if self.header_value is not None and not self.header:
            raise ValueError(f"TTL rule {self.name!r}: header_value needs a header")
        glob = self.model is not None and not GLOB_CHARS.isdisjoint(self.model)
        model = re.compile(fnmatch.translate(self.model)) if glob and self.model else None
        pattern = _compile("pattern", self.pattern) if self.pattern is not None else None
        value = _compile("header_value", self.header_value) if self.header_value else None
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_pattern", pattern)
        object.__setattr__(self, "_header_value", value)
        if self.header:
            object.__setattr__(self, "header", self.header.lower())

    def matches(
        self, route: str, body: Mapping[str, Any], tenant: str, headers: Mapping[str, str]
    ) -> bool:
        """Do all of this rule's conditions hold? `headers` is case-insensitive (or lowercase)."""
        if self.tenant is not None and tenant != self.tenant:
            return False
        if self.model is not None:
            model = body.get("model")
            if not isinstance(model, str):
                return False
            if self._model is None and model != self.model:
                return False
            if self._model is not None and self._model.match(model) is None:
                return False
        if self.header:
            value = headers.get(self.header)
            if value is None:
                return False
            if self._header_value is not None and self._header_value.search(value) is None:
                return False
        if self._pattern is not None:
            text = query_text(route, body)
            if text is None or self._pattern.search(text) is None:
                return False
        return True


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "\n".join(parts) if parts else None
    return None


def query_text(route: str, body: Mapping[str, Any]) -> str | None:
    """The text a rule's pattern is searched in: the last user message's text (its text parts,
    one per line) for chat, the prompt (strings one per line) for completions; `None` when there
    is no such text (no user message, token ids)."""
    if route == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text(message.get("content"))
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    return prompt if isinstance(prompt, str) else None


class TTLRules:
    """An ordered list of rules and the TTL for requests none of them matches."""

    __slots__ = ("default_ttl", "rules")

    def __init__(
        self, rules: Sequence[TTLRule], *, default_ttl: int, max_ttl: int | None = None
    ) -> None:
        names = [rule.name for rule in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"TTL rule names must be unique: {names}")
        if max_ttl is not None:
            for rule in rules:
                if rule.ttl > max_ttl:
                    raise ValueError(f"TTL rule {rule.name!r}: ttl exceeds max_ttl {max_ttl}")
        self.rules = tuple(rules)
        self.default_ttl = default_ttl

    def choose(
        self, route: str, body: Mapping[str, Any], tenant: str, headers: Mapping[str, str]
    ) -> tuple[int, str | None]:
        """(TTL, name of the rule that decided it); `(default_ttl, None)` when none matched."""
        for rule in self.rules:
            if rule.matches(route, body, tenant, headers):
                return rule.ttl, rule.name
        return self.default_ttl, None
