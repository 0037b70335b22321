"""Reassembling engine streams into the answer a non-streaming request would have received."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.assembly import StreamAssembler

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def chunk(*choices: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({**HEAD, "choices": list(choices), **extra})


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish}


def assemble(route: str, events: list[bytes]) -> tuple[dict[str, Any] | None, list[str]]:
    assembler = StreamAssembler(route)  # type: ignore[arg-type]
    kinds = [assembler.feed(event) for event in events]
    return assembler.result(), kinds


def vllm_chat_stream() -> list[bytes]:
    """What vLLM sends for a short chat answer with `include_usage`."""
    return [
        chunk(delta(role="assistant", content="")),
        chunk(delta(content="Paris")),
        chunk(delta(content=" is")),
        chunk(
            {**delta(content=" the capital.", finish="stop"), "stop_reason": None},
        ),
        chunk(usage=USAGE),
        b"[DONE]",
    ]


def test_a_vllm_chat_stream_becomes_its_non_streaming_answer() -> None:
    answer, kinds = assemble("chat", vllm_chat_stream())
    assert kinds == ["chunk", "chunk", "chunk", "finish", "usage", "done"]
    assert answer == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris is the capital."},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": USAGE,
    }


def test_tool_call_arguments_are_concatenated_by_index() -> None:
    events = [
        chunk(delta(role="assistant", content="")),
        chunk(
            delta(
                tool_calls=[
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q": '},
                    }
                ]
            )
        ),
        chunk(
            delta(
                tool_calls=[
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "fetch", "arguments": ""},
                    }
                ]
            )
        ),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '"x"}'}}])),
        chunk(delta(tool_calls=[{"index": 1, "function": {"arguments": "{}"}}])),
        chunk(delta(finish="tool_calls")),
        b"[DONE]",
    ]
    answer, _ = assemble("chat", events)
    assert answer is not None
    message = answer["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": "x"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "fetch", "arguments": "{}"}},
    ]


def test_reasoning_logprobs_and_fingerprint_are_kept() -> None:
    lp = [{"token": "Hi", "logprob": -0.1, "bytes": None, "top_logprobs": []}]
    events = [
        chunk(delta(role="assistant", reasoning_content="think "), system_fingerprint="fp1"),
        chunk(delta(reasoning_content="hard")),
        chunk({**delta(content="Hi"), "logprobs": {"content": lp}}),
        chunk({**delta(content="!"), "logprobs": {"content": [{**lp[0], "token": "!"}]}}),
        chunk(delta(finish="length")),
        b"[DONE]",
    ]
    answer, _ = assemble("chat", events)
    assert answer is not None
    assert answer["system_fingerprint"] == "fp1"
    choice = answer["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hi!",
        "reasoning_content": "think hard",
    }
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["Hi", "!"]
    assert choice["finish_reason"] == "length"
    assert "usage" not in answer  # the stream carried none


def test_choices_are_kept_apart_by_index() -> None:
    events = [
        chunk(delta(0, role="assistant", content=""), delta(1, role="assistant", content="")),
        chunk(delta(1, content="B")),
        chunk(delta(0, content="A")),
        chunk(delta(0, finish="stop"), delta(1, finish="length")),
        b"[DONE]",
    ]
    answer, _ = assemble("chat", events)
    assert answer is not None
    assert [(c["message"]["content"], c["finish_reason"]) for c in answer["choices"]] == [
        ("A", "stop"),
        ("B", "length"),
    ]


def test_a_completions_stream_with_logprobs() -> None:
    head = {"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m"}

    def piece(text: str, finish: str | None = None, offset: int = 0) -> bytes:
        logprobs = {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [None],
                    "text_offset": [offset]}  # fmt: skip
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return orjson.dumps({**head, "choices": [choice]})

    answer, _ = assemble("completions", [piece("Once"), piece(" upon", "length", 4), b"[DONE]"])
    assert answer is not None
    assert answer["object"] == "text_completion"
    choice = answer["choices"][0]
    assert choice["text"] == "Once upon"
    assert choice["logprobs"]["tokens"] == ["Once", " upon"]
    assert choice["logprobs"]["text_offset"] == [0, 4]
    assert choice["finish_reason"] == "length"


INCOMPLETE = [
    pytest.param(vllm_chat_stream()[:-1], id="no-done"),
    pytest.param([*vllm_chat_stream()[:3], b"[DONE]"], id="done-before-finish"),
    pytest.param(
        [*vllm_chat_stream()[:2], b'{"error": {"message": "boom", "code": 500}}', b"[DONE]"],
        id="error-event",
    ),
    pytest.param([*vllm_chat_stream()[:2], b"{not json", *vllm_chat_stream()[2:]], id="bad-json"),
    pytest.param(
        [chunk({**delta(content="x"), "token_ids": [1]}), chunk(delta(finish="stop")), b"[DONE]"],
        id="unknown-choice-field",
    ),
    pytest.param(
        [
            chunk(delta(content="x", function_call={"name": "f"})),
            chunk(delta(finish="stop")),
            b"[DONE]",
        ],
        id="unknown-delta-field",
    ),
    pytest.param(
        [
            chunk(delta(content="x"), prompt_token_ids=[1, 2]),
            chunk(delta(finish="stop")),
            b"[DONE]",
        ],
        id="unknown-top-field",
    ),
    pytest.param([chunk(delta(content=5)), chunk(delta(finish="stop")), b"[DONE]"], id="non-text"),
    pytest.param([b"[DONE]"], id="no-choices"),
]


@pytest.mark.parametrize("events", INCOMPLETE)
def test_incomplete_or_unfaithful_streams_give_nothing_to_store(events: list[bytes]) -> None:
    answer, _ = assemble("chat", events)
    assert answer is None


def test_null_and_empty_extras_are_not_unfaithful() -> None:
    events = [
        chunk({**delta(role="assistant", content="", tool_calls=[]), "token_ids": None},
              prompt_token_ids=None),
        chunk(delta(content="ok", finish="stop")),
        b"[DONE]",
    ]  # fmt: skip
    answer, _ = assemble("chat", events)
    assert answer is not None
    assert answer["choices"][0]["message"]["content"] == "ok"


def test_nothing_is_taken_after_done() -> None:
    assembler = StreamAssembler("chat")
    for event in vllm_chat_stream():
        assembler.feed(event)
    assert assembler.feed(chunk(delta(content="late"))) == "invalid"
    answer = assembler.result()
    assert answer is not None
    assert answer["choices"][0]["message"]["content"] == "Paris is the capital."
