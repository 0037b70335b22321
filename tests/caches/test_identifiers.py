"""The identifier guard: opaque ids swapped (or dropped) between otherwise identical questions.

Every case is written by hand. Each is checked in both directions: the guard is symmetric.
"""

from __future__ import annotations

import pytest

from caches.guards import GUARDS
from caches.identifiers import identifier_mismatch, identifiers


@pytest.mark.parametrize(
    ("cached", "query"),
    [
        # hex ids, hashes, UUIDs, colours
        ("What is the status of batch 3fa94c2e?", "What is the status of batch 7be0d13a?"),
        ("Why did commit a3f9c21 break the build?", "Why did commit 9bd04e7 break the build?"),
        (
            "Show job 123e4567-e89b-12d3-a456-426614174000",
            "Show job 123e4567-e89b-12d3-a456-426614174001",
        ),
        ("Is #ff0000 a good accent colour?", "Is #00ff00 a good accent colour?"),
        # order numbers, SKUs, tickets, codes with separators
        ("Where is my order #A1234?", "Where is my order #B9876?"),
        ("Is SKU-12345-XL in stock?", "Is SKU-12345-XS in stock?"),
        ("Who owns ticket ABC-123?", "Who owns ticket ABC-124?"),
        ("Cancel booking ref QX7-91K2", "Cancel booking ref QX7-91K3"),
        ("Refund invoice INV_2023_0042", "Refund invoice INV_2023_0043"),
        ("Is CS101 hard?", "Is CS102 hard?"),
        ("Recap of S07E01", "Recap of S07E02"),
        # versions and product names swapped
        ("What changed in release 2.3.1?", "What changed in release 2.3.2?"),
        ("What is new in v2.3.1?", "What is new in v2.4.0?"),
        ("How do I convert mp3 to wav?", "How do I convert mp4 to wav?"),
        ("Should I buy a PS4 this year?", "Should I buy a PS3 this year?"),
        ("Is the i5 good for gaming?", "Is the i7 good for gaming?"),
        ("What caused WW1?", "What caused WW2?"),
        # a strong id on one side only: an answer about one order is no answer about "my order"
        ("What is the status of order A1234?", "What is the status of my order?"),
        ("Why is build 3fa94c2e failing?", "Why is the build failing?"),
        # case and separators do not hide a swap
        ("where is order a-1234", "Where is order B-9876?"),
    ],
)
def test_swapped_or_dropped_identifiers_are_vetoed(cached: str, query: str) -> None:
    assert identifier_mismatch(cached, query)
    assert identifier_mismatch(query, cached)


@pytest.mark.parametrize(
    ("cached", "query"),
    [
        # the same identifier, written differently
        ("What is the status of batch 3FA94C2E?", "status of batch 3fa94c2e"),
        ("Where is my order #A1234?", "Where's order A-1234?"),
        ("What is COVID-19?", "What is covid19?"),
        ("What is covid19?", "What is covid 19?"),
        ("Is SKU-12345-XL in stock?", "Is sku12345xl in stock?"),
        ("What changed in v2.3.1?", "What changed in v 2.3.1?"),
        # ordinary letter-digit words present on both sides
        ("Is mp3 better than flac?", "Is flac better than mp3?"),
        ("How do I enable IPv6 on my router?", "How can I turn on ipv6 on a router?"),
        ("What is the chemical formula H2O?", "Why is water written H2O?"),
        ("Is a 4k TV worth it?", "Are 4K TVs worth buying?"),
        ("Can covid19 spread by air?", "Can COVID19 spread through the air?"),
        # a weak identifier added or dropped: a detail, left to the model
        ("How do I enable IPv6?", "How do I enable the new internet protocol?"),
        ("How close are we to a nuclear war?", "How close are we to WW3/nuclear war?"),
        ("Release notes for 2.3.1", "What is in the latest release?"),
        # amounts are numbers (the number guard's), not identifiers
        ("Best phone under 10k?", "Best phone under 12k?"),
        ("Best earphones under 1k?", "Best earphones under 1000Rs?"),
        ("Is 16GB of RAM enough?", "Is 8GB of RAM enough?"),
        ("Was the Rs500 note banned?", "Was the 500 rupee note banned?"),
        ("Phones in the 10k-12k range?", "Phones between 10k and 12k?"),
        ("Is 1080p enough on a 24-inch screen?", "Is 1080 p enough on a 24 inch monitor?"),
        ("What happened in the 21st century?", "What happened in the twenty-first century?"),
        ("Why did abolitionists oppose slavery?", "What did pre-1861 abolitionists argue?"),
        ("How did the mid-1990s boom end?", "How did the 1990s boom end?"),
        # no identifiers at all; alternatives written with "/"
        ("How do I learn to swim?", "How can I learn swimming?"),
        ("What do you think of DotA/DotA2?", "What do you think about DotA2?"),
        ("Can I use PayPal on an F1 visa?", "Can I use PayPal on F1/OPT?"),
        ("Who won step 2.Then what?", "Who won step 2. Then what?"),
    ],
)
def test_matching_or_ordinary_tokens_are_not_vetoed(cached: str, query: str) -> None:
    assert not identifier_mismatch(cached, query)
    assert not identifier_mismatch(query, cached)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Status of batch 3FA94C2E?", {"3fa94c2e": "strong"}),
        ("Order #A1234 and SKU-12345-XL", {"a1234": "strong", "sku12345xl": "strong"}),
        ("mp3, IPv6, H2O and covid-19", {"mp3": "weak", "ipv6": "weak", "h2o": "weak"}),
        ("release v2.3.1 on 4.4.2", {"v2.3.1": "weak", "4.4.2": "weak"}),
        ("the b1-visa and x86-64", {"b1": "weak", "x8664": "strong"}),
        ("10k, 16GB, 1080p, 21st, 1960s, Rs500, US3.95, 2.5", {}),
        ("deadbeef cafe 123456", {}),
    ],
)
def test_identifiers_and_their_kinds(text: str, expected: dict[str, str]) -> None:
    assert identifiers(text) == expected


def test_identifier_is_a_named_guard() -> None:
    assert GUARDS["identifier"] is identifier_mismatch
