"""What the relay of a cacheable stream forwards, and when."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.tee import StreamTee

HEAD = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "m"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return f"data: {data}\n\n".encode()


def delta(content: str | None = None, finish: str | None = None, **top: Any) -> bytes:
    fields = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": fields, "logprobs": None, "finish_reason": finish}
    return event({**HEAD, "choices": [choice], **top})


ROLE = event({**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]})  # fmt: skip
BODY = [ROLE, delta("Hel"), delta("lo")]
FINISH = delta(finish="stop")
DONE = b"data: [DONE]\n\n"


def usage_chunk(**top: Any) -> bytes:
    return event({**HEAD, "choices": [], "usage": USAGE, **top})


def run(tee: StreamTee, pieces: list[bytes]) -> tuple[bytes, bytes]:
    now, after = b"", b""
    for piece in pieces:
        forwarded, held_back = tee.feed(piece)
        assert not (after and forwarded), "nothing may overtake [DONE]"
        now, after = now + forwarded, after + held_back
    return now, after


def test_without_hiding_every_event_goes_through_unchanged() -> None:
    stream = [*BODY, FINISH, usage_chunk(), DONE]
    tee = StreamTee("chat", hide_usage=False)
    now, after = run(tee, stream)
    assert now == b"".join(stream[:-1])
    assert after == DONE
    answer = tee.answer()
    assert answer is not None
    assert answer["choices"][0]["message"]["content"] == "Hello"
    assert answer["usage"] == USAGE


def test_the_usage_we_asked_for_is_hidden_and_its_fingerprint_moves_to_the_finish() -> None:
    """vLLM 0.32 with include_usage puts system_fingerprint on the usage chunk, not the finish."""
    tee = StreamTee("chat", hide_usage=True)
    now, after = run(tee, [*BODY, FINISH, usage_chunk(system_fingerprint="fp-1"), DONE])
    assert after == DONE
    events = [orjson.loads(block[6:]) for block in now.split(b"\n\n") if block]
    assert now.startswith(b"".join(BODY))
    assert all(chunk["choices"] for chunk in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["system_fingerprint"] == "fp-1"
    answer = tee.answer()
    assert answer is not None
    assert answer["system_fingerprint"] == "fp-1"
    assert answer["usage"] == USAGE  # stored all the same


def test_a_finish_chunk_without_a_fingerprint_to_take_is_forwarded_as_it_came() -> None:
    tee = StreamTee("chat", hide_usage=True)
    now, after = run(tee, [*BODY, FINISH, usage_chunk(), DONE])
    assert now == b"".join([*BODY, FINISH])
    assert after == DONE


def test_a_held_finish_chunk_is_released_when_no_usage_follows() -> None:
    tee = StreamTee("chat", hide_usage=True)
    forwarded, _ = tee.feed(b"".join([*BODY, FINISH]))
    assert forwarded == b"".join(BODY)  # the finish chunk waits for the next event
    now, after = tee.feed(DONE)
    assert (now, after) == (FINISH, DONE)
    broken = StreamTee("chat", hide_usage=True)
    broken.feed(b"".join([*BODY, FINISH]))
    assert broken.flush() == FINISH  # the stream broke off: it goes out before the error


@pytest.mark.parametrize("hide_usage", [False, True])
def test_any_split_of_the_bytes_forwards_the_same(hide_usage: bool) -> None:
    stream = b"".join([*BODY, FINISH, usage_chunk(system_fingerprint="fp"), DONE])
    expected = run(StreamTee("chat", hide_usage=hide_usage), [stream])
    for cut in range(1, len(stream)):
        tee = StreamTee("chat", hide_usage=hide_usage)
        assert run(tee, [stream[:cut], stream[cut:]]) == expected, cut
        assert tee.answer() is not None


def test_nothing_to_store_until_done() -> None:
    tee = StreamTee("chat", hide_usage=False)
    tee.feed(b"".join([*BODY, FINISH]))
    assert not tee.done
    assert tee.answer() is None
    _, after = tee.feed(DONE + b": trailing comment\n\n")
    assert tee.done
    assert after == DONE + b": trailing comment\n\n"
    assert tee.feed(b"more") == (b"more", b"")
