"""Replaying stored answers as streams: the chunks' shape, their sizes, and the round trip."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.assembly import StreamAssembler
from gateway.replay import LIMIT_CHARS, TARGET_CHARS, ReplayError, replay, split_text
from gateway.sse import EventReader

USAGE = {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49}
LONG = "The quick brown fox jumps over the lazy dog, again and again. " * 40


def chat_answer(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-42",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": list(choices),
        "usage": USAGE,
        **extra,
    }


def chat_choice(index: int = 0, finish: str = "stop", **message: Any) -> dict[str, Any]:
    message.setdefault("content", "")
    return {
        "index": index,
        "message": {"role": "assistant", **message},
        "logprobs": None,
        "finish_reason": finish,
    }


def text_answer(*choices: dict[str, Any]) -> dict[str, Any]:
    return {"id": "cmpl-7", "object": "text_completion", "created": 1, "model": "m",
            "choices": list(choices), "usage": USAGE}  # fmt: skip


def text_choice(text: str, logprobs: Any = None, finish: str = "length") -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}


def token_logprobs(tokens: list[str]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": -0.25, "bytes": list(t.encode()),
                         "top_logprobs": []} for t in tokens]}  # fmt: skip


TOKENS = ["Hello", ",", " world", "!", " How", " are", " you", " today", "?"]

ROUND_TRIPS = [
    pytest.param("chat", chat_answer(chat_choice(content="Paris.")), id="short"),
    pytest.param("chat", chat_answer(chat_choice(content="")), id="empty"),
    pytest.param("chat", chat_answer(chat_choice(content=LONG, finish="length")), id="long"),
    pytest.param(
        "chat", chat_answer(chat_choice(content="naïve café — 東京 🚀 " * 5)), id="unicode"
    ),
    pytest.param(
        "chat",
        chat_answer(
            chat_choice(
                finish="tool_calls",
                content=None,
                tool_calls=[
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "lookup",
                            "arguments": orjson.dumps(
                                {"query": "capital of France " * 4, "limit": 3}
                            ).decode(),
                        },
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "fetch", "arguments": "{}"},
                    },
                ],
            )
        ),
        id="tool-calls",
    ),
    pytest.param(
        "chat",
        chat_answer(chat_choice(content="It is 4.", reasoning_content="2 plus 2 " * 10)),
        id="reasoning",
    ),
    pytest.param(
        "chat",
        chat_answer(chat_choice(content="Sorry.", refusal="I cannot help with that request.")),
        id="refusal",
    ),
    pytest.param(
        "chat",
        chat_answer({**chat_choice(content="".join(TOKENS)), "logprobs": token_logprobs(TOKENS)}),
        id="logprobs-aligned",
    ),
    pytest.param(
        "chat",
        chat_answer(
            {
                **chat_choice(content="Hi there, friend"),
                "logprobs": token_logprobs(["bytes:\\xe2", "Hi"]),
            }
        ),
        id="logprobs-not-spelling-the-text",
    ),
    pytest.param(
        "chat",
        chat_answer(chat_choice(0, content="first " * 9), chat_choice(1, content="second")),
        id="two-choices",
    ),
    pytest.param(
        "chat",
        chat_answer({**chat_choice(content="x"), "stop_reason": "###"}, system_fingerprint="fp"),
        id="stop-reason-and-fingerprint",
    ),
    pytest.param("completions", text_answer(text_choice("Once upon a time " * 8)), id="text"),
    pytest.param(
        "completions",
        text_answer(
            text_choice(
                "".join(TOKENS),
                {
                    "tokens": TOKENS,
                    "token_logprobs": [-0.1] * len(TOKENS),
                    "top_logprobs": [None] * len(TOKENS),
                    "text_offset": list(range(len(TOKENS))),
                },
            )
        ),
        id="text-logprobs",
    ),
]


def events_of(stream: bytes) -> list[bytes | None]:
    return [event.data for event in EventReader().feed(stream)]


def reassemble(route: str, stream: bytes) -> dict[str, Any] | None:
    assembler = StreamAssembler(route)  # type: ignore[arg-type]
    for data in events_of(stream):
        assert data is not None
        assembler.feed(data)
    return assembler.result()


@pytest.mark.parametrize(("route", "answer"), ROUND_TRIPS)
@pytest.mark.parametrize("include_usage", [True, False])
def test_replay_reassembles_to_the_stored_answer(
    route: str, answer: dict[str, Any], include_usage: bool
) -> None:
    stream = replay(orjson.dumps(answer), route, include_usage=include_usage)  # type: ignore[arg-type]
    expected = dict(answer)
    if not include_usage:
        del expected["usage"]
    assert reassemble(route, stream) == expected


@pytest.mark.parametrize(("route", "answer"), ROUND_TRIPS)
def test_every_chunk_carries_the_stored_identity(route: str, answer: dict[str, Any]) -> None:
    data = events_of(replay(orjson.dumps(answer), route, include_usage=True))  # type: ignore[arg-type]
    assert data[-1] == b"[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1] if d is not None]
    expected_object = "chat.completion.chunk" if route == "chat" else "text_completion"
    for chunk in chunks:
        assert chunk["id"] == answer["id"]
        assert chunk["created"] == answer["created"]
        assert chunk["model"] == answer["model"]
        assert chunk["object"] == expected_object
        assert chunk.get("system_fingerprint") == answer.get("system_fingerprint")
    # OpenAI's include_usage shape: usage null everywhere but the last chunk, which has no choices.
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == USAGE


def test_chat_replay_opens_with_the_role_and_ends_with_the_finish() -> None:
    answer = chat_answer(chat_choice(content=LONG, finish="length"))
    data = events_of(replay(orjson.dumps(answer), "chat", include_usage=False))
    chunks = [orjson.loads(d) for d in data[:-1] if d is not None]
    assert all("usage" not in chunk for chunk in chunks)
    first, *middle, last = (chunk["choices"][0] for chunk in chunks)
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert last == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    pieces = [choice["delta"]["content"] for choice in middle]
    assert "".join(pieces) == LONG
    # Sensible pieces: never one per character, never one blob.
    assert len(pieces) > len(LONG) // (LIMIT_CHARS + 1)
    assert all(len(piece) <= LIMIT_CHARS for piece in pieces)
    assert all(len(piece) >= TARGET_CHARS for piece in pieces[:-1])


def test_aligned_logprobs_travel_with_their_text() -> None:
    answer = chat_answer(
        {**chat_choice(content="".join(TOKENS)), "logprobs": token_logprobs(TOKENS)}
    )
    data = events_of(replay(orjson.dumps(answer), "chat", include_usage=False))
    for raw in data[1:-2]:  # the content chunks
        assert raw is not None
        choice = orjson.loads(raw)["choices"][0]
        tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
        assert "".join(tokens) == choice["delta"]["content"]


def test_vllm_null_extras_are_fine_to_replay() -> None:
    answer = chat_answer(
        {**chat_choice(content="ok", tool_calls=[], refusal=None, annotations=None, audio=None,
                       function_call=None, reasoning_content=None), "stop_reason": None,
         "token_ids": None},
        prompt_logprobs=None, prompt_token_ids=None, kv_transfer_params=None,
    )  # fmt: skip
    stream = replay(orjson.dumps(answer), "chat", include_usage=False)
    result = reassemble("chat", stream)
    assert result is not None
    assert result["choices"][0]["message"] == {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(chat_answer(chat_choice(content="x"), prompt_logprobs=[{"1": {}}]),
                     id="prompt-logprobs"),
        pytest.param(chat_answer({**chat_choice(content="x"), "token_ids": [1]}), id="token-ids"),
        pytest.param(chat_answer(chat_choice(content=[{"type": "text"}])), id="non-text-content"),
        pytest.param(chat_answer(chat_choice(content="x", audio={"id": "a"})), id="audio"),
        pytest.param({"choices": "nope"}, id="no-choice-list"),
    ],
)  # fmt: skip
def test_what_a_stream_cannot_carry_is_refused(answer: dict[str, Any]) -> None:
    with pytest.raises(ReplayError):
        replay(orjson.dumps(answer), "chat", include_usage=False)


def test_a_body_that_is_not_json_is_refused() -> None:
    with pytest.raises(ReplayError):
        replay(b"<html>", "chat", include_usage=False)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_split_text_concatenates_back_in_sensible_pieces(text: str) -> None:
    pieces = split_text(text)
    assert "".join(pieces) == text
    assert all(0 < len(piece) <= LIMIT_CHARS for piece in pieces)
    assert all(len(piece) >= TARGET_CHARS for piece in pieces[:-1])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("short", ["short"]),
        ("a" * 70, ["a" * 32, "a" * 32, "a" * 6]),
        (
            "hello world this is a longer sentence that needs splitting",
            ["hello world this is a longer", " sentence that needs splitting"],
        ),
    ],
)
def test_split_text_cuts_before_spaces(text: str, expected: list[str]) -> None:
    assert split_text(text) == expected
