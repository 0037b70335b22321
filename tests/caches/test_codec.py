"""The stored form: a versioned msgpack record checked against the key it is read under."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from caches.base import CachedResponse, CacheKey
from caches.codec import FORMAT_VERSION, CorruptEntry, decode, encode

KEY = CacheKey(digest="ab" * 32, tenant="t1", model="m1", route="/v1/chat/completions")
VALUE = CachedResponse(
    body=b'{"id":"x","choices":[]}',
    created_at=1_700_000_000.25,
    expires_at=1_700_003_600.25,
    prompt_tokens=12,
    completion_tokens=3,
)


def record(**changes: Any) -> dict[str, Any]:
    """The record `encode(KEY, VALUE)` writes, with `changes` applied (`...` removes a field)."""
    rec: dict[str, Any] = msgpack.unpackb(encode(KEY, VALUE), raw=False)
    for name, value in changes.items():
        if value is ...:
            rec.pop(name)
        else:
            rec[name] = value
    return rec


def pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def test_round_trip() -> None:
    assert decode(KEY, encode(KEY, VALUE)) == VALUE


def test_round_trip_of_integer_times_gives_floats() -> None:
    data = pack(record(c=100, x=200))
    value = decode(KEY, data)
    assert (value.created_at, value.expires_at) == (100.0, 200.0)
    assert type(value.created_at) is float


def test_record_is_a_self_describing_map() -> None:
    rec = record()
    assert rec["v"] == FORMAT_VERSION
    assert (rec["d"], rec["t"], rec["m"], rec["r"]) == (
        KEY.digest,
        KEY.tenant,
        KEY.model,
        KEY.route,
    )
    assert rec["b"] == VALUE.body


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x92\x01", id="truncated"),
        pytest.param(encode(KEY, VALUE) + b"\x00", id="trailing-bytes"),
        pytest.param(encode(KEY, VALUE)[:-3], id="cut-short"),
        pytest.param(b"\x91" * 10_000, id="too-deep"),
        pytest.param(b"\xa2\xff\xfe", id="invalid-utf8-string"),
        pytest.param(pack({1: 2}), id="int-map-key"),
        pytest.param(b'{"v": 1}', id="json-not-msgpack"),
        pytest.param(b"\x80\x04\x95", id="pickle-header"),
    ],
)
def test_garbage_bytes_are_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptEntry):
        decode(KEY, data)


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param([1, 2, 3], id="array"),
        pytest.param("v", id="string"),
        pytest.param(1, id="int"),
        pytest.param(None, id="nil"),
        pytest.param(b"\x81\xa1v\x01", id="bin"),
        pytest.param(msgpack.ExtType(1, b"x"), id="ext"),
        pytest.param([record()], id="record-in-array"),
    ],
)
def test_non_map_msgpack_is_corrupt(obj: Any) -> None:
    with pytest.raises(CorruptEntry):
        decode(KEY, pack(obj))


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"v": FORMAT_VERSION + 1}, id="newer-version"),
        pytest.param({"v": 0}, id="older-version"),
        pytest.param({"v": str(FORMAT_VERSION)}, id="version-as-string"),
        pytest.param({"v": ...}, id="no-version"),
        pytest.param({"d": "cd" * 32}, id="wrong-digest"),
        pytest.param({"t": "t2"}, id="wrong-tenant"),
        pytest.param({"m": "m2"}, id="wrong-model"),
        pytest.param({"r": "/v1/completions"}, id="wrong-route"),
        pytest.param({"d": KEY.digest.encode()}, id="digest-as-bytes"),
        pytest.param({"t": None}, id="tenant-nil"),
        pytest.param({"m": ...}, id="no-model"),
        pytest.param({"b": VALUE.body.decode()}, id="body-as-string"),
        pytest.param({"b": ...}, id="no-body"),
        pytest.param({"c": "1700000000"}, id="created-as-string"),
        pytest.param({"x": None}, id="expires-nil"),
        pytest.param({"c": ...}, id="no-created"),
        pytest.param({"p": 1.0}, id="prompt-tokens-float"),
        pytest.param({"o": "3"}, id="completion-tokens-string"),
        pytest.param({"p": ...}, id="no-prompt-tokens"),
        pytest.param({"p": True}, id="prompt-tokens-bool"),
        pytest.param({"o": False}, id="completion-tokens-bool"),
        pytest.param({"c": True, "x": True}, id="times-bool"),
        pytest.param({"x": VALUE.created_at - 1}, id="expires-before-created"),
    ],
)
def test_bad_record_is_corrupt(changes: dict[str, Any]) -> None:
    with pytest.raises(CorruptEntry):
        decode(KEY, pack(record(**changes)))


def test_expires_equal_to_created_is_readable() -> None:
    value = decode(KEY, pack(record(x=VALUE.created_at)))
    assert value.expires_at == value.created_at


def test_unknown_extra_fields_are_ignored() -> None:
    # Room for a compatible addition within one format version.
    assert decode(KEY, pack(record(z="later"))) == VALUE


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"x": math.nan}, id="expires-nan"),
        pytest.param({"c": math.nan}, id="created-nan"),
        pytest.param({"x": math.inf}, id="expires-inf"),
    ],
)
def test_non_finite_times_are_corrupt(changes: dict[str, Any]) -> None:
    with pytest.raises(CorruptEntry):
        decode(KEY, pack(record(**changes)))


# --- properties ------------------------------------------------------------------------------

times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
tokens = st.integers(min_value=0, max_value=2**63 - 1)
keys = st.builds(CacheKey, digest=st.text(), tenant=st.text(), model=st.text(), route=st.text())


@st.composite
def values(draw: st.DrawFn) -> CachedResponse:
    created = draw(times)
    return CachedResponse(
        body=draw(st.binary()),
        created_at=created,
        expires_at=created + draw(st.floats(min_value=0, max_value=1e7)),
        prompt_tokens=draw(tokens),
        completion_tokens=draw(tokens),
    )


@given(keys, values())
def test_any_value_round_trips(key: CacheKey, value: CachedResponse) -> None:
    assert decode(key, encode(key, value)) == value


@given(keys, keys, values())
def test_value_is_readable_only_under_its_own_key(
    stored: CacheKey, read: CacheKey, value: CachedResponse
) -> None:
    if stored == read:
        assert decode(read, encode(stored, value)) == value
    else:
        with pytest.raises(CorruptEntry):
            decode(read, encode(stored, value))


@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_corrupt_entry(data: bytes) -> None:
    try:
        value = decode(KEY, data)
    except CorruptEntry:
        return
    assert isinstance(value, CachedResponse)
