"""Opaque identifiers in a question, and the guard that vetoes a hit when they differ.

"Status of batch 3fa94c2e" and "status of batch 7be0d13a" share every word but one, and that one
decides the answer; so do "order #A1234" / "order #B9876", "SKU-12345-XL" / "SKU-12345-XS",
"release 2.3.1" / "release 2.3.2". A sentence embedding puts such pairs almost on top of each
other and the number guard (`caches.guards.numbers_mismatch`) does not see them: their digits
are glued to letters or dotted into versions. `identifier_mismatch` is the guard for them.

Guarantees:
- an identifier is a token that mixes letters and digits ("a1234", "3fa94c2e", "mp3"), its parts
  possibly joined by "-", "_" or "#" ("SKU-123-XL"), or a dotted version ("2.3.1"). Case and
  those joiners do not count ("SKU-123-XL" is "sku123xl"); "/" and ":" end a token;
- amounts are not identifiers but numbers, left to the number guard: a number with a unit or
  multiplier ("10k", "16GB", "1080p", "21st", "1960s") or a currency ("Rs500", "US3.95");
- an identifier is *strong* when it looks opaque: a hex run of six or more characters (UUIDs,
  hashes, colours), three or more letter/digit runs in five or more characters ("s07e01",
  "a1b2c3"), or up to three letters before three or more digits ("A1234", "SKU12345", "CS101").
  The rest are *weak*: product and format names people write in passing ("mp3", "ipv6", "h2o",
  "covid19", "windows10", "i7") and versions;
- an identifier is matched in the other text when it is there, or when two to four consecutive
  tokens there spell it ("covid 19", "H2 O", "v 2.3.1");
- the guard fires when a strong identifier of either text is not matched in the other (an
  answer about one batch is no answer about "my batch" either), or when each text has a weak
  identifier the other does not match (one swapped for another: "mp3" / "mp4", "2.3.1" /
  "2.3.2"). A weak one on one side only is a detail added or dropped, left to the model like a
  one-sided number; so is the same identifier on both sides ("ipv6" / "IPv6").

It is symmetric and pure; results are memoised per text.
"""

from __future__ import annotations

import re
from functools import lru_cache

# A token: alphanumeric runs joined by "-", "_" or "#", and by a dot only between digits ("2.3.1";
# "step 2.Then" is two tokens: questions often lack the space after a full stop). "/" and ":"
# end a token: in questions they mostly separate alternatives ("DotA/DotA2", "F1/OPT").
_TOKEN = re.compile(r"[^\W_]+(?:(?:[-_#]|(?<=\d)\.(?=\d))[^\W_]+)*")
_JOINERS = re.compile(r"[-_#]")
_AMOUNT = re.compile(r"\d[\d.]*[^\W\d_]*")  # "10k", "16gb", "3.5mm", "1080p", "21st", "1960s"
# "Rs500", "US3.95", "NZ75c": an amount of money, not a code.
_CURRENCY = re.compile(r"(?:rs|r|inr|us|usd|nz|nzd|au|aud|cad|eur|gbp)\d+[^\W\d_]{0,2}")
_RUNS = re.compile(r"[^\W\d_]+|\d+")
_VERSION = re.compile(r"v?\d+(?:\.\d+){2,}")
_HEX = re.compile(r"[0-9a-f]{6,}")
_CODE = re.compile(r"[^\W\d_]{1,3}\d{3,}")
_JOINED = 4  # tokens of the other text that may spell one identifier
_WORD = 4  # letters from which a part of a hyphenated token is a word, not part of a code
# Prefixes hyphenated to a number: "pre-1861", "mid-90s" are years, not codes.
_PREFIXES = frozenset({"pre", "post", "mid", "non", "anti", "ex", "co", "re", "sub", "un"})


def _parts(token: str) -> list[str]:
    """A hyphenated token as identifiers see it: joined ("SKU-123-XL" is "sku123xl") except at
    words and prefixes ("b1-visa" is "b1", "visa"; "pre-1861" is "pre", "1861") and between
    amounts ("10k-12k" is "10k", "12k")."""
    parts = _JOINERS.split(token)
    if len(parts) == 1:
        return parts
    if all(_AMOUNT.fullmatch(p) for p in parts):
        return parts
    groups: list[str] = []
    code: list[str] = []
    for part in parts:
        if part.isalpha() and (len(part) >= _WORD or part in _PREFIXES):
            groups += ["".join(code), part] if code else [part]
            code = []
        else:
            code.append(part)
    return [*groups, "".join(code)] if code else groups


@lru_cache(maxsize=4096)
def _tokens(text: str) -> tuple[str, ...]:
    """`text`'s tokens, lower-cased, hyphenated codes joined (`_parts`)."""
    return tuple(part for token in _TOKEN.findall(text.lower()) for part in _parts(token))


def _kind(token: str) -> str:
    """ "strong", "weak", or "" for a token that is no identifier (see the module's rules)."""
    if token.isalpha() or token.isdigit():  # most tokens: settled without a regex
        return ""
    if _VERSION.fullmatch(token):
        return "weak"  # a version or a dotted date: like a number, a swap is what counts
    plain = token.replace(".", "")
    runs = _RUNS.findall(plain)
    if len(runs) < 2 or _AMOUNT.fullmatch(plain) or _CURRENCY.fullmatch(plain):
        return ""
    if _HEX.fullmatch(plain) or (len(runs) >= 3 and len(plain) >= 5) or _CODE.fullmatch(plain):
        return "strong"
    return "weak"


@lru_cache(maxsize=4096)
def _identifiers(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((token, kind) for token in dict.fromkeys(_tokens(text)) if (kind := _kind(token)))


def identifiers(text: str) -> dict[str, str]:
    """Each identifier of `text` (lower case, joiners removed) with its kind, "strong" or "weak"."""
    return dict(_identifiers(text))


@lru_cache(maxsize=4096)
def _spellings(text: str) -> frozenset[str]:
    """Every run of one to `_JOINED` consecutive tokens of `text`, written without spaces."""
    tokens = _tokens(text)
    return frozenset(
        "".join(tokens[i : i + n]) for n in range(1, _JOINED + 1) for i in range(len(tokens))
    )


def _unmatched(text: str, other: str) -> set[str]:
    """The kinds of `text`'s identifiers that `other` does not match."""
    found = _identifiers(text)
    if not found:
        return set()
    spelled = _spellings(other)
    return {kind for token, kind in found if token not in spelled}


def identifier_mismatch(cached: str, query: str) -> bool:
    """The texts name different things by an opaque identifier ("batch 3fa94c2e" / "batch
    7be0d13a", "order #A1234" / "order #B9876", "mp3" / "mp4")."""
    a, b = _unmatched(cached, query), _unmatched(query, cached)
    return "strong" in a | b or (bool(a) and bool(b))
