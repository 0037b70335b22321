"""End to end with the real vLLM CPU engine and the default model, through `strata serve`."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from engine import EngineClient
from engine.fingerprint import PROBE, UNLISTED, fingerprint
from tests.engine.conftest import MODEL, TENANT_KEYS, Stack

pytestmark = pytest.mark.vllm


# The SDK clients a test made, closed after it: a pooled connection left to the garbage collector
# is an unclosed-socket warning, which this suite treats as an error.
_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def client(stack: Stack, tenant: str = "tenant-a") -> openai.OpenAI:
    c = openai.OpenAI(
        base_url=stack.gateway.url + "/v1", api_key=TENANT_KEYS[tenant], max_retries=0,
        timeout=300,
    )  # fmt: skip
    _clients.append(c)
    return c


def system_prompt(tag: str) -> str:
    # ~400 tokens that no other test uses, so prefix-cache hits are this test's own.
    return f"[{tag}] " + " ".join(
        f"Guideline {i}: answer questions about subject {i} briefly and accurately."
        for i in range(28)
    )


def chat(c: openai.OpenAI, messages, **params):  # type: ignore[no-untyped-def]
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 12)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **params)
    return raw.headers, raw.http_response.content, raw.parse()


def cached_tokens(completion) -> int:  # type: ignore[no-untyped-def]
    details = completion.usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def engine_answers(stack: Stack) -> float:
    text = httpx.get(stack.gateway.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('strata_engine_request_duration_seconds_count{route="chat"}'):
            return float(line.split()[-1])
    return 0.0


def test_real_answer_then_identical_l1_hit(vllm_stack: Stack) -> None:
    c = client(vllm_stack)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    before = engine_answers(vllm_stack)
    h1, body1, first = chat(c, question)
    h2, body2, _ = chat(c, question)
    assert h1["x-strata-cache"] == "miss"
    assert (h2["x-strata-cache"], h2["x-strata-layer"]) == ("hit", "l1")
    assert body2 == body1  # byte-identical
    # A real answer, not just some text: this caught vLLM CPU's broken bfloat16 kernels.
    assert "Paris" in (first.choices[0].message.content or "")
    assert first.choices[0].finish_reason in ("stop", "length")
    assert engine_answers(vllm_stack) == before + 1  # no second engine call


def test_prefix_cache_serves_a_shared_system_prompt(vllm_stack: Stack) -> None:
    c = client(vllm_stack)
    system = {"role": "system", "content": system_prompt(uuid.uuid4().hex)}
    hits_before = vllm_stack.engine_counter("vllm:prefix_cache_hits_total")
    cached = []
    for question in ("What is the capital of France?", "Name a primary color.", "What is 2+2?"):
        _, _, answer = chat(c, [system, {"role": "user", "content": question}])
        assert answer.usage.prompt_tokens >= 300
        cached.append(cached_tokens(answer))
    assert cached[0] == 0
    assert cached[1] > 0
    assert cached[2] > 0
    assert vllm_stack.engine_counter("vllm:prefix_cache_hits_total") > hits_before
    metrics = httpx.get(vllm_stack.gateway.url + "/metrics", timeout=10).text
    assert "strata_engine_prefix_cache_hits_total" in metrics
    assert "strata_engine_cached_prompt_tokens_total" in metrics


def test_cache_salt_keeps_tenants_apart(vllm_stack: Stack) -> None:
    system = {"role": "system", "content": system_prompt(uuid.uuid4().hex)}
    question = {"role": "user", "content": "What is the capital of France?"}
    _, _, a_first = chat(client(vllm_stack, "tenant-a"), [system, question])
    _, _, a_again = chat(
        client(vllm_stack, "tenant-a"), [system, {"role": "user", "content": "Hi"}]
    )
    _, _, b_first = chat(client(vllm_stack, "tenant-b"), [system, question])
    _, _, b_again = chat(
        client(vllm_stack, "tenant-b"), [system, {"role": "user", "content": "Hi"}]
    )
    assert cached_tokens(a_first) == 0
    assert cached_tokens(a_again) > 0  # tenant A's own prefix is warm
    assert cached_tokens(b_first) == 0  # but not for tenant B
    assert cached_tokens(b_again) > 0


def streamed(c: openai.OpenAI, messages, **params):  # type: ignore[no-untyped-def]
    """The X-Strata-Cache header and the concatenated text of one streamed answer."""
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True, **params
    )
    chunks = list(raw.parse())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return raw.headers["x-strata-cache"], text, chunks


def test_stream_is_stored_and_replayed_with_identical_text(vllm_stack: Stack) -> None:
    c = client(vllm_stack)
    messages = [{"role": "user", "content": f"Say hello. ({uuid.uuid4().hex[:6]})"}]
    before = engine_answers(vllm_stack)
    miss, live, live_chunks = streamed(c, messages)
    hit, replayed, chunks = streamed(c, messages, stream_options={"include_usage": True})
    assert (miss, hit) == ("miss", "hit")
    assert live
    assert replayed == live
    # The usage chunk the gateway asked for is hidden, and the fingerprint vLLM put on it is on
    # the finish chunk, where vLLM puts it when the client streams without usage.
    assert all(chunk.choices for chunk in live_chunks)
    assert live_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert live_chunks[-1].system_fingerprint is not None
    assert {chunk.system_fingerprint for chunk in chunks} == {live_chunks[-1].system_fingerprint}
    # vLLM reported usage to the gateway although this client's first stream did not ask for it.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0
    headers, _, whole = chat(c, messages, max_tokens=24)
    assert headers["x-strata-cache"] == "hit"
    assert whole.choices[0].message.content == live
    assert engine_answers(vllm_stack) == before + 1  # one generation served all three


def test_client_disconnect_aborts_the_generation(vllm_stack: Stack) -> None:
    c = client(vllm_stack)
    messages = [{"role": "user", "content": f"Count to one thousand. ({uuid.uuid4().hex[:6]})"}]
    stream = c.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=2000, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for number, _ in enumerate(stream, 1):
        if number == 3:
            break
    running = vllm_stack.engine_counter("vllm:num_requests_running")
    stream.close()
    deadline = time.monotonic() + 60
    while vllm_stack.engine_counter("vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM kept generating for a client that left"
        time.sleep(0.2)
    assert running == 1  # it was generating when the client left
    again = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=2000, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert again.headers["x-strata-cache"] == "miss"  # nothing was stored
    again.http_response.close()


def test_the_engine_fingerprint_covers_the_chat_template_and_is_stable(vllm_stack: Stack) -> None:
    async def twice() -> tuple[str | None, str | None]:
        engine = EngineClient(vllm_stack.engine_url)
        try:
            return (await fingerprint(engine), await fingerprint(engine))
        finally:
            await engine.aclose()

    first, second = asyncio.run(twice())
    assert first is not None
    assert first == second != UNLISTED
    # It is vLLM's /tokenize with the chat template applied that went into it.
    probe = {"model": MODEL, "messages": list(PROBE), "add_generation_prompt": True}
    tokens = httpx.post(vllm_stack.engine_url + "/tokenize", json=probe, timeout=30).json()
    assert len(tokens["tokens"]) > 30
    metrics = httpx.get(vllm_stack.gateway.url + "/metrics", timeout=10).text
    assert "strata_model_epoch_known 1.0" in metrics


def test_zz_engine_crash_is_restarted(vllm_stack: Stack) -> None:
    """Last in the module: kills vLLM under the gateway and waits for the restart. The same model
    comes back with the same fingerprint, so what was cached before is still served."""
    c = client(vllm_stack)
    kept = [{"role": "user", "content": f"Kept? {uuid.uuid4().hex[:6]}"}]
    assert chat(c, kept)[0]["x-strata-cache"] == "miss"
    os.killpg(vllm_stack.vllm_pid(), signal.SIGKILL)
    time.sleep(1)
    down = httpx.post(
        vllm_stack.gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {TENANT_KEYS['tenant-a']}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 0,
              "max_tokens": 2, "seed": 99},
        timeout=30,
    )  # fmt: skip
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "engine_unavailable"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if "restarted and healthy" in vllm_stack.gateway.log.read_text():
            break
        time.sleep(2)
    else:
        pytest.fail(f"vLLM was not restarted:\n{vllm_stack.gateway.tail()}")
    _, _, answer = chat(c, [{"role": "user", "content": f"Back? {uuid.uuid4().hex[:6]}"}])
    assert answer.choices[0].message.content is not None
    assert chat(c, kept)[0]["x-strata-cache"] == "hit"
    assert "model changed" not in vllm_stack.gateway.log.read_text()
