"""`strata warm` and `POST /admin/cache/entries`, against the real app and the fake engine."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from caches import MemoryCache
from gateway.remote import Target
from gateway.warm import Progress, WarmReport, parse_line, warm
from tests.asgi_server import served
from tests.gateway.harness import COMPLETIONS, MODEL, chat_body, gateway

FILL = "/admin/cache/entries"


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def prompts() -> list[Any]:
    """20 lines: 14 distinct cacheable requests (one already cached), 2 repeats, 1 sampled,
    1 bad line, 1 entry to fill, 1 unknown model."""
    lines: list[Any] = [chat_body(f"Question number {i}?") for i in range(1, 14)]
    lines.append(chat_body("Question number 2?"))  # a repeat
    reordered = dict(reversed(list(chat_body("Question number 5?").items())))
    lines.append({**reordered, "stream": True})  # a repeat too: stream is not part of the key
    lines.append({"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8})
    lines.append(chat_body("Tell me a joke.", temperature=0.7))
    lines.append("{this is not json")
    lines.append({"request": chat_body("What is Strata?"), "response": "A caching gateway."})
    lines.append(chat_body("Hello?", model="no-such-model"))
    assert len(lines) == 20
    return lines


async def test_warm_stores_skips_and_fails_and_real_requests_then_hit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "warm.jsonl", prompts())
    async with gateway() as gw, served(gw.app) as url:
        await gw.chat(chat_body("Question number 1?"))  # cached before the run
        report = await warm(path, Target(url), concurrency=4, request_timeout=10)

        assert report.lines == 20
        assert report.stored == 14  # 12 chat + 1 completion + 1 entry
        assert report.skipped == {
            "repeats an earlier line": 2,
            "already cached": 1,
            "not cacheable (nondeterministic)": 1,
        }
        assert [line for line, _ in sorted(report.failures)] == [18, 20]
        failures = dict(report.failures)
        assert failures[18].startswith("not JSON")
        assert failures[20].startswith("HTTP 404")
        engine_calls = gw.engine_calls()

        for i in range(1, 14):
            again = await gw.chat(chat_body(f"Question number {i}?"))
            assert again.headers["x-strata-cache"] == "hit", i
        completion = await gw.client.post(COMPLETIONS, json=prompts()[15])
        assert completion.headers["x-strata-cache"] == "hit"
        filled = await gw.chat(chat_body("What is Strata?"))
        assert filled.headers["x-strata-cache"] == "hit"
        answer = filled.json()
        assert answer["object"] == "chat.completion"
        assert answer["model"] == MODEL
        assert answer["choices"][0]["message"] == {
            "role": "assistant",
            "content": "A caching gateway.",
        }
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert gw.engine_calls() == engine_calls  # every hit came from the cache


async def test_dry_run_sends_nothing(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "warm.jsonl", prompts())
    async with gateway() as gw, served(gw.app) as url:
        report = await warm(path, Target(url), dry_run=True)
        assert gw.engine_calls() == 0
    assert report.stored == 0
    assert report.skipped["dry run: request"] == 16
    assert report.skipped["dry run: entry"] == 1
    assert [line for line, _ in report.failures] == [18]


async def test_the_command_reports_and_exits_1_on_failures(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "warm.jsonl", prompts())
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    async with gateway() as gw, served(gw.app) as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "warm", str(path), "--url", url,
            "--concurrency", "3", "--timeout", "10",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    report = out.decode()
    assert proc.returncode == 1, err.decode()
    assert report.startswith("15 stored, 3 skipped, 2 failed (20 lines)")
    assert "failed: line 18: not JSON" in report
    assert "failed: line 20: HTTP 404" in report
    assert "20/20 stored 15 skipped 3 failed 2" in err.decode()  # progress, not a terminal


async def test_the_command_exits_0_without_failures(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "warm.jsonl", [chat_body("One?"), chat_body("Two?")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["STRATA_API_KEY"] = "sk-team-a-0001"
    async with gateway(api_keys={"team-a": "sk-team-a-0001"}) as gw, served(gw.app) as url:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "warm", str(path), "--url", url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("2 stored, 0 skipped, 0 failed")


async def test_warm_fills_for_the_tenant_of_its_api_key(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "warm.jsonl", [entry(), chat_body("One?")])
    async with (
        gateway(api_keys={"team-a": "sk-team-a-0001"}, admin_key="admin-secret") as gw,
        served(gw.app) as url,
    ):
        report = await warm(path, Target(url, admin_key="admin-secret", api_key="sk-team-a-0001"))
        hit = await gw.chat(
            chat_body("What is Strata?"), headers={"authorization": "Bearer sk-team-a-0001"}
        )
    assert (report.stored, report.failures) == (2, [])
    assert hit.headers["x-strata-cache"] == "hit"


async def test_an_unreachable_gateway_fails_every_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "warm.jsonl", [chat_body("One?"), chat_body("Two?")])
    report = await warm(path, Target("http://127.0.0.1:9"), request_timeout=5)
    assert report.stored == 0
    assert len(report.failures) == 2
    assert all("cannot reach the gateway" in message for _, message in report.failures)


@pytest.mark.parametrize(
    ("text", "path_or_error"),
    [
        (json.dumps(chat_body()), "/v1/chat/completions"),
        (json.dumps({"model": "m", "prompt": "p"}), "/v1/completions"),
        (json.dumps({"route": "completions", "model": "m", "messages": []}), "/v1/completions"),
        (json.dumps({"request": chat_body(), "response": "x"}), "/admin/cache/entries"),
        ("[1, 2]", "not a JSON object"),
        ("nope", "not JSON"),
        (json.dumps({"model": "m"}), "neither `messages`"),
        (json.dumps({"route": "embeddings", "model": "m", "input": "x"}), "route must be"),
        (json.dumps({"request": [], "response": "x"}), "`request` is not an object"),
    ],
)
def test_parse_line(text: str, path_or_error: str) -> None:
    if path_or_error.startswith("/"):
        job = parse_line(3, text)
        assert job.path == path_or_error
        assert "route" not in job.body or job.fill
    else:
        with pytest.raises(ValueError, match=path_or_error):
            parse_line(3, text)


def test_progress_on_a_terminal_is_redrawn_at_most_ten_times_a_second() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = Progress(4, out, tty=True, clock=lambda: now[0])
    report = WarmReport()
    report.add(1, "stored")
    progress.update(report)
    report.add(2, "skipped", "already cached")
    progress.update(report)  # too soon: not drawn
    now[0] = 0.2
    report.add(3, "failed", "boom")
    progress.update(report)
    report.add(4, "stored")
    progress.update(report, final=True)
    assert out.getvalue().split("\r")[1:] == [
        "[#######.......................] 1/4 stored 1 skipped 0 failed 0",
        "[######################........] 3/4 stored 1 skipped 1 failed 1",
        "[##############################] 4/4 stored 2 skipped 1 failed 1\n",
    ]


def test_progress_elsewhere_is_a_line_every_tenth() -> None:
    out = io.StringIO()
    progress = Progress(20, out, tty=False)
    report = WarmReport()
    for line in range(1, 21):
        report.add(line, "stored")
        progress.update(report)
    progress.update(report, final=True)
    assert out.getvalue().splitlines() == [
        f"{n}/20 stored {n} skipped 0 failed 0" for n in range(2, 21, 2)
    ]


# --- POST /admin/cache/entries ----------------------------------------------------------------


def entry(**fields: Any) -> dict[str, Any]:
    return {"request": chat_body("What is Strata?"), "response": "A caching gateway.", **fields}


async def test_fill_answers_the_key_and_a_stream_replays_it() -> None:
    async with gateway() as gw:
        response = await gw.client.post(FILL, json=entry(usage={"prompt_tokens": 7}))
        assert response.status_code == 200
        body = response.json()
        assert body["stored"] is True
        assert len(body["key"]) == 64
        assert (body["ttl"], body["ttl_rule"]) == (3600, "default")
        hit = await gw.chat(chat_body("What is Strata?"))
        assert hit.json()["usage"] == {
            "prompt_tokens": 7,
            "completion_tokens": 0,
            "total_tokens": 7,
        }
        streamed = await gw.chat(chat_body("What is Strata?", stream=True))
    assert streamed.headers["x-strata-cache"] == "hit"
    assert "A caching gateway." in "".join(
        orjson.loads(line[6:])["choices"][0]["delta"].get("content", "")
        for line in streamed.text.splitlines()
        if line.startswith("data: {") and orjson.loads(line[6:])["choices"]
    )
    assert gw.engine_calls() == 0


async def test_fill_with_a_whole_completion_object_is_served_as_given() -> None:
    request = {"model": MODEL, "prompt": "2 + 2 =", "temperature": 0}
    answer = {
        "id": "cmpl-given",
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "text": " 4", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
    async with gateway() as gw:
        filled = await gw.client.post(FILL, json={"request": request, "response": answer})
        assert filled.status_code == 200
        hit = await gw.client.post(COMPLETIONS, json=request)
    assert hit.headers["x-strata-cache"] == "hit"
    assert hit.json() == answer


async def test_fill_follows_ttl_rules_and_the_client_ttl() -> None:
    rules = [{"name": "strata", "ttl": 60, "pattern": "Strata"}]
    async with gateway(ttl_rules=rules) as gw:
        by_rule = (await gw.client.post(FILL, json=entry())).json()
        by_client = (await gw.client.post(FILL, json=entry(), headers={"x-strata-ttl": "9"})).json()
        assert (by_rule["ttl"], by_rule["ttl_rule"]) == (60, "strata")
        assert (by_client["ttl"], by_client["ttl_rule"]) == (9, "client")
        gw.clock.advance(10)
        assert (await gw.chat(chat_body("What is Strata?"))).headers["x-strata-cache"] == "miss"


async def test_fill_is_per_tenant() -> None:
    keys = {"team-a": "sk-team-a-0001", "team-b": "sk-team-b-0002"}
    async with gateway(api_keys=keys, admin_key="admin-secret") as gw:
        headers = {"x-strata-admin-key": "admin-secret", "authorization": "Bearer sk-team-a-0001"}
        assert (await gw.client.post(FILL, json=entry(), headers=headers)).status_code == 200
        a = await gw.chat(
            chat_body("What is Strata?"), headers={"authorization": headers["authorization"]}
        )
        b = await gw.chat(
            chat_body("What is Strata?"), headers={"authorization": "Bearer sk-team-b-0002"}
        )
        no_tenant = await gw.client.post(
            FILL, json=entry(), headers={"x-strata-admin-key": "admin-secret"}
        )
    assert a.headers["x-strata-cache"] == "hit"
    assert b.headers["x-strata-cache"] == "miss"
    assert no_tenant.status_code == 401
    assert no_tenant.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"x-strata-admin-key": "wrong-key"}, 401),
        ({"authorization": "Bearer s3cret"}, 200),
    ],
)
async def test_fill_needs_the_admin_key_when_one_is_set(
    headers: dict[str, str], status: int
) -> None:
    async with gateway(admin_key="s3cret") as gw:
        response = await gw.client.post(FILL, json=entry(), headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_admin_key"


def chat_answer(finish: str = "stop", **fields: Any) -> dict[str, Any]:
    answer = {
        "id": "x", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": finish}],
    }  # fmt: skip
    answer.update(fields)
    return answer


@pytest.mark.parametrize(
    ("content", "param", "code"),
    [
        pytest.param(b"{not json", None, "invalid_json", id="not-json"),
        pytest.param(b"[]", None, "invalid_json", id="not-an-object"),
        pytest.param({"response": "x"}, "request", "invalid_value", id="no-request"),
        pytest.param({"request": chat_body()}, "response", "invalid_value", id="no-response"),
        pytest.param(entry(response=42), "response", "invalid_value", id="response-type"),
        pytest.param(entry(extra=1), "extra", "invalid_value", id="unknown-field"),
        pytest.param(entry(route="embeddings"), "route", "invalid_value", id="bad-route"),
        pytest.param(
            {"request": {"model": MODEL}, "response": "x"}, "request", "invalid_value",
            id="no-messages-or-prompt",
        ),
        pytest.param(
            entry(request={"messages": [{"role": "user", "content": "x"}], "temperature": 0}),
            "model", "invalid_value", id="request-invalid",
        ),
        pytest.param(
            entry(request=chat_body(temperature=0.8)), "request", "not_cacheable",
            id="nondeterministic",
        ),
        pytest.param(entry(request=chat_body(n=2)), "request", "not_cacheable", id="n-2"),
        pytest.param(
            entry(response=chat_answer("content_filter")), "response", "not_storable",
            id="incomplete-answer",
        ),
        pytest.param(
            entry(response=chat_answer(object="text_completion")), "response.object",
            "invalid_value", id="wrong-object",
        ),
        pytest.param(
            entry(response=chat_answer(choices=[])), "response.choices", "invalid_value",
            id="no-choices",
        ),
        pytest.param(entry(usage=[1]), "usage", "invalid_value", id="usage-type"),
    ],
)  # fmt: skip
async def test_fill_refuses_bad_entries_with_openai_errors(
    content: Any, param: str | None, code: str
) -> None:
    raw = content if isinstance(content, bytes) else orjson.dumps(content)
    async with gateway() as gw:
        response = await gw.client.post(
            FILL, content=raw, headers={"content-type": "application/json"}
        )
        l1 = gw.chain.layers[0]
        assert isinstance(l1, MemoryCache)
        assert len(l1) == 0
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


async def test_fill_refuses_an_answer_over_the_entry_limit() -> None:
    async with gateway(max_entry_bytes=200) as gw:
        response = await gw.client.post(FILL, json=entry(response="x" * 300))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "entry_too_large"
