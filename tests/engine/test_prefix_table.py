"""The prefix table: owners, live counts, expiry by age and by size, a replica forgotten."""

from __future__ import annotations

import pytest

from engine.prefix_table import PrefixTable
from tests.clock import FakeClock


def test_a_prefix_is_owned_where_it_was_last_placed() -> None:
    table = PrefixTable(3, clock=FakeClock())
    assert table.owner(7) is None
    table.place(7, 1)
    table.place(8, 1)
    assert (table.owner(7), table.counts) == (1, [0, 2, 0])
    table.place(7, 2)  # moved
    assert (table.owner(7), table.counts, len(table)) == (2, [0, 1, 1], 2)


def test_prefixes_unused_for_the_ttl_are_forgotten_and_use_keeps_them() -> None:
    clock = FakeClock()
    table = PrefixTable(2, ttl=10, clock=clock)
    table.place(1, 0)
    table.place(2, 1)
    clock.advance(6)
    table.seen(1)  # used again (an overflow elsewhere counts too)
    table.seen(99)  # not placed: nothing to keep
    clock.advance(6)
    assert table.owner(2) is None  # 12 s unused
    assert table.owner(1) == 0  # 6 s since its last use
    assert (table.counts, len(table)) == ([1, 0], 1)


def test_past_max_keys_the_least_recently_used_goes() -> None:
    table = PrefixTable(2, max_keys=2, clock=FakeClock())
    table.place(1, 0)
    table.place(2, 1)
    table.seen(1)
    table.place(3, 1)
    assert [table.owner(k) for k in (1, 2, 3)] == [0, None, 1]
    assert table.counts == [1, 1]


def test_forgetting_a_replica_drops_its_prefixes() -> None:
    table = PrefixTable(2, clock=FakeClock())
    for key, replica in ((1, 0), (2, 1), (3, 0)):
        table.place(key, replica)
    table.forget_replica(0)
    assert [table.owner(k) for k in (1, 2, 3)] == [None, 1, None]
    assert (table.counts, len(table)) == ([0, 1], 1)


@pytest.mark.parametrize("kw", [{"ttl": 0}, {"max_keys": 0}])
def test_bad_limits_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        PrefixTable(2, **kw)  # type: ignore[arg-type]
