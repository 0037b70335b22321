"""The pure parts of routing over replicas: the affinity key, the ring, bounded-load placement."""

from __future__ import annotations

import math
from typing import Any

import pytest

from engine.prefix_table import PrefixTable
from engine.routing import (
    Choice,
    Ring,
    affinity_key,
    in_turn,
    leading_text,
    least_loaded,
    load_bound,
    place,
)

BLOCK = 64
SYSTEM = "You are the support assistant of a bicycle shop. " * 6  # ~300 characters
OTHER_SYSTEM = "You are a careful translator from French to English. " * 6


def chat(*messages: tuple[str, Any], model: str = "m", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": role, "content": content} for role, content in messages],
        **extra,
    }


def key(body: dict[str, Any], route: str = "chat", **kw: Any) -> int | None:
    kw.setdefault("block_chars", BLOCK)
    kw.setdefault("max_blocks", 16)
    return affinity_key(route, body, **kw)


@pytest.mark.parametrize(
    ("case", "a", "b", "same"),
    [
        (
            "one system prompt, different questions",
            chat(("system", SYSTEM), ("user", "Where is my order?")),
            chat(("system", SYSTEM), ("user", "Do you repair e-bikes?")),
            True,
        ),
        (
            "different system prompts",
            chat(("system", SYSTEM), ("user", "Hi")),
            chat(("system", OTHER_SYSTEM), ("user", "Hi")),
            False,
        ),
        (
            "different models",
            chat(("system", SYSTEM), ("user", "Hi"), model="a"),
            chat(("system", SYSTEM), ("user", "Hi"), model="b"),
            False,
        ),
        (
            "sampling parameters do not matter",
            chat(("system", SYSTEM), ("user", "Hi"), temperature=0),
            chat(("system", SYSTEM), ("user", "Hi"), temperature=0.7, max_tokens=5),
            True,
        ),
        (
            "earlier turns are part of the prefix",
            chat(("system", "Be brief."), ("user", "Tell me one thing. " * 8), ("user", "Q1")),
            chat(("system", "Be brief."), ("user", "Tell me another. " * 8), ("user", "Q1")),
            False,
        ),
        (
            "past the cap, differences do not count",
            chat(("system", SYSTEM * 10 + "tail one"), ("user", "Hi")),
            chat(("system", SYSTEM * 10 + "tail two"), ("user", "Hi")),
            True,
        ),
        (
            "a partial last block does not count",
            chat(("system", "x" * (BLOCK * 2 - 20) + "ab"), ("user", "Hi")),
            chat(("system", "x" * (BLOCK * 2 - 20) + "cd"), ("user", "Hi")),
            True,
        ),
        (
            "tools are part of the prefix",
            chat(("system", SYSTEM), ("user", "Hi"), tools=[{"type": "function", "name": "a"}]),
            chat(("system", SYSTEM), ("user", "Hi"), tools=[{"type": "function", "name": "b"}]),
            False,
        ),
        (
            "text parts read as the same text",
            chat(("system", [{"type": "text", "text": SYSTEM}]), ("user", "Hi")),
            chat(("system", SYSTEM), ("user", "Hi")),
            True,
        ),
        (
            "completions share a long prompt prefix",
            {"model": "m", "prompt": SYSTEM * 4 + "Question: one?"},
            {"model": "m", "prompt": SYSTEM * 4 + "Question: two?"},
            True,
        ),
    ],
)
def test_affinity_key_groups_requests_that_share_leading_blocks(
    case: str, a: dict[str, Any], b: dict[str, Any], same: bool
) -> None:
    route = "completions" if "prompt" in a else "chat"
    first, second = key(a, route), key(b, route)
    assert first is not None, case
    assert second is not None, case
    assert (first == second) is same, case


def test_affinity_key_depends_on_the_salt() -> None:
    body = chat(("system", SYSTEM), ("user", "Hi"))
    assert key(body, salt="tenant-a") != key(body, salt="tenant-b")
    assert key(body, salt="tenant-a") == key(body, salt="tenant-a")


@pytest.mark.parametrize(
    ("case", "body", "route"),
    [
        ("a bare question", chat(("user", "What is the capital of France? " * 20)), "chat"),
        ("a short system prompt", chat(("system", "Be brief."), ("user", "Hi")), "chat"),
        ("no messages", {"model": "m", "messages": []}, "chat"),
        ("messages not a list", {"model": "m", "messages": "hello"}, "chat"),
        ("a short completion prompt", {"model": "m", "prompt": "2+2="}, "completions"),
        ("a batch of prompts", {"model": "m", "prompt": [SYSTEM, SYSTEM]}, "completions"),
        ("token ids", {"model": "m", "prompt": list(range(500))}, "completions"),
    ],
)  # fmt: skip
def test_no_affinity_key_without_a_whole_leading_block(
    case: str, body: dict[str, Any], route: str
) -> None:
    assert key(body, route) is None, case


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([("system", "S"), ("user", "Q")], "<system>\nS\n"),
        ([("system", "S"), ("user", "A"), ("assistant", "B"), ("user", "Q")],
         "<system>\nS\n<user>\nA\n<assistant>\nB\n"),
        # No user message: everything before the last message.
        ([("system", "S"), ("assistant", "B")], "<system>\nS\n"),
        # Messages after the last user message (a tool answer) are not in the prefix.
        ([("system", "S"), ("user", "Q"), ("assistant", "C")], "<system>\nS\n"),
    ],
)  # fmt: skip
def test_leading_text_is_what_precedes_the_last_user_message(
    messages: list[tuple[str, str]], expected: str
) -> None:
    assert leading_text("chat", chat(*messages), 10_000) == expected


def test_leading_text_reads_no_more_than_its_limit() -> None:
    body = chat(*[("user", "x" * 1000) for _ in range(50)], ("user", "last"))
    assert len(leading_text("chat", body, 256)) == 256


def test_ring_walk_visits_every_replica_once() -> None:
    ring = Ring(["a", "b", "c"])
    for k in (0, 1, 2**63, 2**64 - 1, 12345678901234):
        assert sorted(ring.walk(k)) == [0, 1, 2]


def test_ring_moves_only_the_keys_of_a_removed_replica() -> None:
    names = ["http://e1", "http://e2", "http://e3", "http://e4"]
    full, without = Ring(names), Ring(names[:3])
    keys = [key(chat(("system", f"{i} " * 40), ("user", "q"))) for i in range(2000)]
    owners = [(next(full.walk(k)), next(without.walk(k))) for k in keys if k is not None]
    moved = [(a, b) for a, b in owners if a != b]
    assert all(a == 3 for a, _ in moved)  # only e4's keys moved
    share = sum(a == 3 for a, _ in owners) / len(owners)
    assert 0.15 < share < 0.35  # e4 owned about a quarter of the key space


@pytest.mark.parametrize(
    ("factor", "in_flight", "healthy", "slack", "bound"),
    [
        (1.25, 0, 2, 0, 1),
        (1.25, 1, 2, 0, 2),
        (1.25, 7, 2, 0, 5),
        (1.25, 7, 2, 2, 7),  # 8 clients over 2 replicas: 7 of 8 on one before it spills
        (1.25, 99, 2, 0, 63),
        (1.25, 99, 2, 2, 65),  # under load the slack is a rounding error
        (1.0, 99, 4, 0, 25),
        (2.0, 9, 3, 0, 7),
        (1.25, 5, 0, 0, 8),  # no healthy replica: counted as one
    ],
)
def test_load_bound(factor: float, in_flight: int, healthy: int, slack: int, bound: int) -> None:
    assert load_bound(factor, in_flight, healthy, slack) == bound


def first_choice(ring: Ring, k: int) -> int:
    return next(ring.walk(k))


RING = Ring(["http://a", "http://b", "http://c"])
KEY = 0x0123456789ABCDEF
FIRST, SECOND, THIRD = list(RING.walk(KEY))
ALL = [True, True, True]


def loads(**by_rank: int) -> list[int]:
    out = [0, 0, 0]
    for rank, load in by_rank.items():
        out[{"first": FIRST, "second": SECOND, "third": THIRD}[rank]] = load
    return out


def flags(*off: int) -> list[bool]:
    return [i not in off for i in range(3)]


@pytest.mark.parametrize(
    ("case", "load", "healthy", "eligible", "expected"),
    [
        ("idle: its own replica", loads(), ALL, ALL, Choice(FIRST, "affinity")),
        # total 3 in flight, bound ceil(1.25 * 4 / 3) = 2: the first has 2, so the next.
        ("first at the bound", loads(first=2, third=1), ALL, ALL, Choice(SECOND, "overflow")),
        ("first under the bound", loads(first=1, second=1), ALL, ALL, Choice(FIRST, "affinity")),
        ("first and second at the bound", loads(first=3, second=3), ALL, ALL,
         Choice(THIRD, "overflow")),
        # An ejected replica's keys pass to the next healthy one: still its affinity.
        ("first ejected", loads(), flags(FIRST), flags(FIRST), Choice(SECOND, "affinity")),
        # Tried already (a retry): passed over, the next healthy one is an overflow.
        ("first tried", loads(), ALL, flags(FIRST), Choice(SECOND, "overflow")),
        # Every eligible replica at the bound: the least loaded of them.
        ("only loaded ones left", loads(first=0, second=4, third=3), ALL, flags(FIRST),
         Choice(THIRD, "overflow")),
        ("nothing eligible", loads(), ALL, [False, False, False], None),
    ],
)  # fmt: skip
def test_place_with_bounded_loads(
    case: str,
    load: list[int],
    healthy: list[bool],
    eligible: list[bool],
    expected: Choice | None,
) -> None:
    choice = place(KEY, RING, load, healthy, eligible, factor=1.25)
    assert (choice and Choice(choice.index, choice.reason)) == expected, case


@pytest.mark.parametrize(
    ("case", "load", "owner", "prefixes", "expected"),
    [
        # 4 live prefixes over 3 replicas: share ceil(1.25 * 4 / 3) = 2, new ones up to 2.
        ("its owner, though the ring says otherwise", loads(), THIRD, loads(first=1, third=2),
         Choice(THIRD, "affinity", home=True)),
        ("a new prefix, its ring replica has room", loads(), None, loads(second=2, third=2),
         Choice(FIRST, "affinity", home=True)),
        # 5 live prefixes: a new one goes where fewer than ceil(1.25 * 6 / 3) = 3 live.
        ("a new prefix, its ring replica holds its share", loads(), None,
         loads(first=3, second=1, third=1), Choice(SECOND, "overflow", home=True)),
        # The owner is busy (in flight at the bound): this request overflows, the prefix stays.
        ("its owner at the in-flight bound", loads(third=2, second=1), THIRD,
         loads(first=1, third=2), Choice(FIRST, "affinity", home=False)),
        # The owner holds more than its share (a replica rejoined): the prefix moves home.
        ("its owner over its share", loads(), THIRD, loads(third=4),
         Choice(FIRST, "affinity", home=True)),
        # Over its share, but the prefix's ring replica: it stays (others' prefixes move).
        ("its owner, its ring replica, over its share", loads(), FIRST, loads(first=4),
         Choice(FIRST, "affinity", home=True)),
        ("its owner, not its ring replica, over its share", loads(), SECOND, loads(second=4),
         Choice(FIRST, "affinity", home=True)),
    ],
)  # fmt: skip
def test_place_keeps_prefixes_with_their_owner_within_its_share(
    case: str, load: list[int], owner: int | None, prefixes: list[int], expected: Choice
) -> None:
    choice = place(KEY, RING, load, ALL, ALL, factor=1.25, owner=owner, prefixes=prefixes)
    assert choice == expected, case


def keys_homed_on(ring: Ring, replica: int, count: int) -> list[int]:
    keys = (k for n in range(10_000) if (k := key(chat(("system", f"p{n} " * 40), ("u", "q")))))
    return [k for k in keys if first_choice(ring, k) == replica][:count]


@pytest.mark.parametrize(("replicas", "prefixes"), [(2, 8), (2, 3), (3, 10), (4, 16)])
def test_prefixes_that_hash_to_one_replica_are_spread_within_the_bound(
    replicas: int, prefixes: int
) -> None:
    """The worst case of hashing few prompts: every one to the same replica. Placed one after
    the other, sequentially (no load), no replica ends with more than ceil(c * n / replicas)."""
    ring = Ring([f"http://engine-{i}" for i in range(replicas)])
    table = PrefixTable(replicas)
    everyone = [True] * replicas
    idle = [0] * replicas
    for k in keys_homed_on(ring, 0, prefixes) * 3:  # each asked three times
        assert table.route(k, ring, idle, everyone, everyone, factor=1.25) is not None
    assert len(table) == prefixes
    assert max(table.counts) <= math.ceil(1.25 * prefixes / replicas)
    assert table.counts[0] == max(table.counts)  # their ring replica kept the most


@pytest.mark.parametrize("slack", [0, 2])
@pytest.mark.parametrize("replicas", [2, 3, 5])
@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_one_hot_prefix_never_pushes_a_replica_past_the_bound(
    replicas: int, factor: float, slack: int
) -> None:
    """100 concurrent requests with one prefix, none finishing: every placement is under the
    bound of its moment, and at the end no replica holds more than ceil(c * 100 / n) + slack."""
    ring = Ring([f"http://engine-{i}" for i in range(replicas)])
    load = [0] * replicas
    everyone = [True] * replicas
    reasons = []
    for _ in range(100):
        bound = load_bound(factor, sum(load), replicas, slack)
        choice = place(KEY, ring, load, everyone, everyone, factor=factor, slack=slack)
        assert choice is not None
        assert load[choice.index] < bound
        load[choice.index] += 1
        reasons.append(choice.reason)
    assert max(load) <= math.ceil(factor * 100 / replicas) + slack
    assert load[first_choice(ring, KEY)] == max(load)  # its own replica took the most
    assert reasons[0] == "affinity"
    # With c >= n the bound never binds (c = 2 over two replicas allows one to hold all).
    assert ("overflow" in reasons) is (factor < replicas)


@pytest.mark.parametrize(
    ("load", "eligible", "start", "expected"),
    [
        ([3, 1, 2], [True, True, True], 0, 1),
        ([3, 1, 2], [True, False, True], 0, 2),
        ([0, 0, 0], [True, True, True], 2, 2),  # ties go to the first from `start`
        ([0, 0, 0], [True, True, True], 1, 1),
        ([5, 5], [False, False], 0, None),
    ],
)
def test_least_loaded(
    load: list[int], eligible: list[bool], start: int, expected: int | None
) -> None:
    assert least_loaded(load, eligible, start) == expected


@pytest.mark.parametrize(
    ("turn", "eligible", "expected"),
    [
        (0, [True, True], 0),
        (1, [True, True], 1),
        (1, [True, False], 0),
        (5, [True, True, True], 2),
        (0, [False, False], None),
    ],
)
def test_in_turn(turn: int, eligible: list[bool], expected: int | None) -> None:
    assert in_turn(turn % len(eligible), eligible) == expected


def test_a_replica_that_took_over_gives_prefixes_back_when_the_other_rejoins() -> None:
    """Replica 1 was ejected and replica 0 took all 8 prefixes; once 1 is back, asking each
    prefix again sends replica 1's own back to it while replica 0 holds more than its share,
    ceil(c * 8 / 2) = 5; replica 0 keeps its own; then nothing moves."""
    ring = Ring(["http://engine-0", "http://engine-1"])
    table = PrefixTable(2)
    keys = keys_homed_on(ring, 0, 4) + keys_homed_on(ring, 1, 4)
    for k in keys:
        table.place(k, 0)
    everyone, idle = [True, True], [0, 0]

    def ask_each() -> list[int]:
        homes = []
        for k in keys:
            assert table.route(k, ring, idle, everyone, everyone, factor=1.25) is not None
            homes.append(table.owner(k) or 0)
        return homes

    first = ask_each()
    assert first[:4] == [0, 0, 0, 0]  # its own prefixes never move
    assert first[4:] == [1, 1, 1, 0]  # back home until replica 0 is within its share
    assert table.counts == [5, 3]
    assert ask_each() == first  # stable
