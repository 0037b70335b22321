"""What the engine is serving, as one short string: the model epoch that cached answers belong to.

Guarantees: `fingerprint` changes when the engine's served models change (name, the weights'
folder or hub name — vLLM's `root` —, context length) or when the way it turns a conversation into
tokens changes (the tokenizer or the chat template: a fixed probe conversation is tokenized with
vLLM's `/tokenize`, template applied); it is the same for every gateway asking the same engine
build, so replicas agree on it and share entries. Fields that differ between two runs of the same
model (`created`, ids of requests) are left out. An engine without `/tokenize` (another
OpenAI-compatible server) is fingerprinted by its model list alone. The whole check is bounded by
`deadline`; an engine that cannot be asked gives `None`, never a guess.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson

from engine.client import Engine
from engine.errors import EngineError

# Roles, markup, digits and non-ASCII text: a changed template or tokenizer shows in its tokens.
PROBE = (
    {"role": "system", "content": "You are a careful assistant. Réponds en français si besoin."},
    {"role": "user", "content": "Convert 12.5 km to miles; then <b>bold</b> `code` 你好 🙂?"},
    {"role": "assistant", "content": "12.5 km is about 7.77 miles."},
    {"role": "user", "content": "And back again, please."},
)


# The fingerprint of a server that lists no models (no `/v1/models`).
UNLISTED = "unlisted"


# What a model without a chat template answers to a conversation: a fact about it, not a failure.
REFUSED = frozenset({400, 422})


class FingerprintError(Exception):
    """The engine answered, but not in a shape that can be fingerprinted."""


def _models(payload: Any) -> list[dict[str, Any]]:
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or not data:
        raise FingerprintError("/v1/models lists no models")
    models = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise FingerprintError("/v1/models lists a model without an id")
        models.append(
            {
                "id": item["id"],
                "root": item.get("root"),
                "parent": item.get("parent"),
                "max_model_len": item.get("max_model_len"),
            }
        )
    return sorted(models, key=lambda m: str(m["id"]))


def _token_list(body: bytes) -> list[int]:
    try:
        tokens = orjson.loads(body).get("tokens")
    except (orjson.JSONDecodeError, AttributeError):
        tokens = None
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise FingerprintError("/tokenize gave no token list")
    return tokens


async def _tokens(engine: Engine, model: str, deadline: float) -> Any:
    """The probe conversation's tokens; for a model without a chat template, the probe's text as
    a plain prompt; `None` for servers without `/tokenize`."""
    chat = {"model": model, "messages": PROBE, "add_generation_prompt": True}
    answer = await engine.probe("/tokenize", orjson.dumps(chat), deadline=deadline)
    if answer.status in (404, 405):
        return None
    if answer.status == 200:
        return _token_list(answer.body)
    if answer.status not in REFUSED:
        raise FingerprintError(f"/tokenize answered {answer.status}")  # maybe transient: ask again
    text = "\n".join(m["content"] for m in PROBE)
    plain = {"model": model, "prompt": text}
    answer = await engine.probe("/tokenize", orjson.dumps(plain), deadline=deadline)
    if answer.status in REFUSED:
        # Deterministic for a given engine build, so replicas still agree.
        return {"tokenize_status": answer.status}
    if answer.status != 200:
        raise FingerprintError(f"/tokenize answered {answer.status}")
    return {"prompt": _token_list(answer.body)}


async def fingerprint(engine: Engine, *, deadline: float = 5.0) -> str | None:
    """The engine's fingerprint (16 hex digits), or `None` when it cannot be asked right now."""
    try:
        async with asyncio.timeout(deadline):
            listing = await engine.get("/v1/models", deadline=deadline)
            if listing.status == 404:
                return UNLISTED  # a server without a model list: nothing more to know
            if listing.status != 200:
                return None
            try:
                models = _models(orjson.loads(listing.body))
            except orjson.JSONDecodeError:
                return None
            tokens = {m["id"]: await _tokens(engine, m["id"], deadline) for m in models}
    except (EngineError, FingerprintError, TimeoutError):
        return None
    material = orjson.dumps({"models": models, "tokens": tokens}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(material).hexdigest()[:16]
