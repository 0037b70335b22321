"""Which engine replica a request goes to: the pure parts of routing over several vLLM replicas.

vLLM's prefix cache is per replica, so the replica a request lands on decides whether the KV of
its leading tokens is already computed. Guarantees:

- `affinity_key` is a pure function of the model, a salt (the tenant's `cache_salt`: tenants do
  not share vLLM's prefix cache, so there is nothing to gain from putting them together) and the
  leading part of the prompt — for a chat, everything before the last user message (system
  prompt, tools, earlier turns); for a completion, its prompt — cut to whole KV-block-sized chunks
  (tokens approximated as `block_chars` characters a block) and capped at `max_blocks` blocks.
  Requests that share those leading blocks get the same key; a request with less than one whole
  block of leading text (a bare question) gets none. It never reads more than the capped prefix
  of the prompt.
- `Ring` is a consistent-hash ring with virtual nodes: adding or removing a replica moves only the
  keys that replica owned, and `walk` visits every replica once, clockwise from a key.
- `place` is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018): a
  replica may hold at most `load_bound` = ceil(c · (in-flight total + 1) / healthy replicas)
  + slack requests in flight; a key goes to the first replica on its walk that is eligible and
  under the bound (`affinity` when that is its first choice, `overflow` otherwise), so one hot
  prefix cannot pin all traffic to one replica. With c ≥ 1 some eligible replica is always
  under the bound when every healthy one is eligible. Given the live prefixes per replica, the
  same bound (without the slack) applies to them (the balls of the original paper are keys):
  with few distinct prompts, hashing alone can put most of them on one replica (8 prompts over
  2 replicas: 7 to 1 one time in 16).
- `least_loaded` and `in_turn` are the other policies' choices; ties rotate, so an idle fleet is
  not always asked in the same order.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Policy = Literal["prefix", "round_robin", "least_loaded"]
# Why a replica was chosen; a bounded label set for the routing metrics.
Reason = Literal["affinity", "overflow", "least_loaded", "round_robin", "retry", "panic"]
REASONS: tuple[Reason, ...] = (
    "affinity",
    "overflow",
    "least_loaded",
    "round_robin",
    "retry",
    "panic",
)

# Virtual nodes per replica: with 160, each of two replicas owns 50% ± a few % of the key space.
VNODES = 160


def _hash64(material: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def _content_text(content: Any) -> str:
    """A message's content as text: a string as it is, parts in order (text parts by their text,
    others — images, audio — by their JSON, which is stable for the same part)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                pieces.append(text if isinstance(text, str) else "")
            else:
                pieces.append(orjson.dumps(part, option=orjson.OPT_SORT_KEYS).decode())
        return "\n".join(pieces)
    return "" if content is None else orjson.dumps(content, option=orjson.OPT_SORT_KEYS).decode()


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    role = message.get("role")
    text = f"<{role if isinstance(role, str) else ''}>\n{_content_text(message.get('content'))}"
    extra = {k: message[k] for k in ("name", "tool_calls", "tool_call_id") if k in message}
    if extra:
        text += "\n" + orjson.dumps(extra, option=orjson.OPT_SORT_KEYS).decode()
    return text + "\n"


def leading_text(route: str, body: Mapping[str, Any], limit: int) -> str:
    """At most `limit` characters of what precedes the new part of a request: for a chat, the
    tools and every message before the last user message; for a completion, its text prompt."""
    if route == "completions":
        prompt = body.get("prompt")
        return prompt[:limit] if isinstance(prompt, str) else ""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return ""
    last_user = next(
        (i for i in range(len(messages) - 1, -1, -1)
         if isinstance(messages[i], dict) and messages[i].get("role") == "user"),
        len(messages) - 1,
    )  # fmt: skip
    pieces: list[str] = []
    size = 0
    tools = body.get("tools")
    if tools:
        # Chat templates render the tools into the system part of the prompt.
        pieces.append(orjson.dumps(tools, option=orjson.OPT_SORT_KEYS).decode() + "\n")
        size = len(pieces[0])
    for message in messages[:last_user]:
        if size >= limit:
            break
        piece = _message_text(message)
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)[:limit]


def affinity_key(
    route: str,
    body: Mapping[str, Any],
    *,
    block_chars: int,
    max_blocks: int,
    salt: str = "",
) -> int | None:
    """The request's place on the ring, or `None` when it has no whole block of leading text."""
    text = leading_text(route, body, block_chars * max_blocks)
    blocks = len(text) // block_chars
    if blocks == 0:
        return None
    model = body.get("model")
    material = "\x00".join(
        (model if isinstance(model, str) else "", salt, text[: blocks * block_chars])
    )
    return _hash64(material.encode("utf-8", "surrogatepass"))


class Ring:
    """A consistent-hash ring of `names` (the replicas), `vnodes` points each."""

    def __init__(self, names: Sequence[str], *, vnodes: int = VNODES) -> None:
        if not names or vnodes < 1:
            raise ValueError("a ring needs at least one replica and one virtual node each")
        points = sorted(
            (_hash64(f"{name}#{v}".encode()), index)
            for index, name in enumerate(names)
            for v in range(vnodes)
        )
        self.size = len(names)
        self._hashes = [h for h, _ in points]
        self._owners = [index for _, index in points]

    def walk(self, key: int) -> Iterator[int]:
        """Every replica index once, in ring order clockwise from `key`."""
        seen: set[int] = set()
        start = bisect.bisect_left(self._hashes, key)
        count = len(self._owners)
        for step in range(count):
            owner = self._owners[(start + step) % count]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self.size:
                    return


def load_bound(factor: float, in_flight: int, healthy: int, slack: int = 0) -> int:
    """The most requests one replica may hold in flight, counting the one being placed.

    `slack` requests above ceil(c · share): at a few requests in flight, c alone is a bound of
    one or two requests over the average, and a closed loop of 8 clients over 2 replicas finds
    its home replica over it about one time in five — each such overflow computes a prompt
    another replica has not cached and evicts one of that replica's own. A hot prefix still
    cannot take more than c · share + slack, which is what matters once the engines are busy."""
    return math.ceil(factor * (in_flight + 1) / max(1, healthy)) + slack


@dataclass(frozen=True, slots=True)
class Choice:
    index: int
    reason: Reason
    # The key's prefix lives there from now on (its owner was gone, over its share, or none);
    # False for a request that only overflows while its owner is busy.
    home: bool = False


def least_loaded(loads: Sequence[int], eligible: Sequence[bool], start: int = 0) -> int | None:
    """The eligible replica with the fewest requests in flight; ties go to the first one at or
    after `start` (callers rotate it). `None` when none is eligible."""
    best: int | None = None
    count = len(loads)
    for step in range(count):
        index = (start + step) % count
        if eligible[index] and (best is None or loads[index] < loads[best]):
            best = index
    return best


def in_turn(turn: int, eligible: Sequence[bool]) -> int | None:
    """Round robin: the first eligible replica at or after position `turn`."""
    count = len(eligible)
    for step in range(count):
        index = (turn + step) % count
        if eligible[index]:
            return index
    return None


def place(
    key: int,
    ring: Ring,
    loads: Sequence[int],
    healthy: Sequence[bool],
    eligible: Sequence[bool],
    *,
    factor: float,
    slack: int = 0,
    owner: int | None = None,
    prefixes: Sequence[int] | None = None,
) -> Choice | None:
    """Consistent hashing with bounded loads. `loads` are the requests in flight per replica;
    the bound is shared among the `healthy` ones (an ejected replica's keys pass to the next
    healthy replica on the ring, still `affinity`); a replica that is not `eligible` (ejected, or
    already tried for this request) is passed over. When every eligible replica is at the bound
    (only possible when some healthy ones are not eligible), the least loaded of them.

    With `prefixes` (live prefixes per replica, `engine.prefix_table`) the same bound applies to
    them too: a prefix stays with its `owner` while the owner holds no more than its share,
    ceil(c · live prefixes / healthy), and a prefix new to a replica goes there only while it
    holds fewer than ceil(c · (live prefixes + 1) / healthy). So a few prefixes that happen to
    hash to one replica cannot fill its KV cache while another's stays empty. A prefix on its
    ring replica is never moved for the bound (gateways agree on ring replicas, not on the rest);
    one held elsewhere by a replica over its share — say it took over an ejected replica's
    prefixes — goes back to its ring replica once that one is back and has room."""
    in_flight = sum(load for load, ok in zip(loads, healthy, strict=True) if ok)
    count = sum(healthy)
    bound = load_bound(factor, in_flight, count, slack)
    share = new_share = math.inf
    if prefixes is not None:
        live = sum(n for n, ok in zip(prefixes, healthy, strict=True) if ok)
        share = math.ceil(factor * live / max(1, count))
        new_share = load_bound(factor, live, count)
    keeps = (
        owner is not None
        and healthy[owner]
        and (prefixes is None or prefixes[owner] <= share)
    )  # fmt: skip
    if keeps and owner is not None and eligible[owner] and loads[owner] < bound:
        return Choice(owner, "affinity", home=True)
    first = True
    for index in ring.walk(key):
        if not healthy[index]:
            continue
        if (
            eligible[index]
            and loads[index] < bound
            and (
                prefixes is None
                or (index == owner and (keeps or first))
                or prefixes[index] < new_share
            )
        ):
            return Choice(index, "affinity" if first else "overflow", home=not keeps)
        first = False
    fallback = least_loaded(loads, eligible)
    return None if fallback is None else Choice(fallback, "overflow")
