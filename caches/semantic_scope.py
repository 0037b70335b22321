"""Where a semantic match may come from, and what is compared.

Guarantees (pure functions): the partition is a SHA-256 over the tenant, the model epoch, the
route and the whole request except the text of the last user message — model, every sampling
parameter, system prompt, all earlier turns — so two requests can only match when everything but
that last question is identical; filtering happens by partition before any nearest-neighbour
search. Requests with tools or tool messages, non-text content, no final user message, or a
question longer than the limit are not eligible, with the reason named.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from caches.keys import canonical_body

SCOPE_VERSION = 1
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call")


@dataclass(frozen=True, slots=True)
class SemanticScope:
    partition: str
    text: str


def semantic_scope(
    route: str, body: Mapping[str, Any], *, tenant: str, epoch: str, max_chars: int
) -> SemanticScope | str:
    """The scope of a chat request, or the reason it is not eligible for semantic matching."""
    if route != "chat":
        return "route"
    if any(body.get(name) for name in TOOL_FIELDS):
        return "tools"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no-user-message"
    for message in messages:
        if not isinstance(message, dict):
            return "non-text"
        if message.get("role") in ("tool", "function") or message.get("tool_calls"):
            return "tools"
        if not isinstance(message.get("content"), str):
            return "non-text"
    last = messages[-1]
    if last.get("role") != "user":
        return "no-user-message"
    text = str(last["content"]).strip()
    if not text:
        return "no-user-message"
    if len(text) > max_chars:
        return "too-long"
    context = canonical_body(body)
    context["messages"] = [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]
    material = {
        "v": SCOPE_VERSION, "route": route, "tenant": tenant, "epoch": epoch, "context": context,
    }  # fmt: skip
    digest = hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return SemanticScope(partition=digest, text=text)
