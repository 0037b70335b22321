"""Time to first token through Strata on the vLLM CPU engine, prefix caching on vs off.

One run, two engine launches (same model, same flags but for `--no-enable-prefix-caching`), each
behind a Strata gateway. The workload: a ~1,000-token shared system prompt followed by a different
short question per request, streamed with `Cache-Control: no-store` so that Strata's own caches
stay out of it and only the engine's prefix cache differs. TTFT is the time from sending the
request to the first content delta, measured by this client.

    .venv/bin/python -m bench.prefix_ttft [--requests 12] [--out docs/prefix-ttft.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from engine.launcher import EngineSupervisor, LaunchSpec
from engine.model import DEFAULT_SERVED_NAME, default_model_dir, prepare_default_model
from tests.redisproc import free_port

ROOT = Path(__file__).resolve().parents[1]


def shared_prefix() -> str:
    rules = " ".join(
        f"Policy {i}: when a customer asks about order category {i}, confirm the order number, "
        f"check the delivery window, and answer in one short sentence."
        for i in range(34)
    )
    return "You are the support assistant of an online shop. " + rules


QUESTIONS = [
    "Where is my parcel?", "Can I change my address?", "How do I return shoes?",
    "Is express shipping available?", "Do you ship abroad?", "My item arrived broken.",
    "How long does a refund take?", "Can I cancel my order?", "Which payment methods work?",
    "Do you have gift cards?", "The app shows an error.", "Can I order by phone?",
    "Is there a student discount?", "What are your opening hours?", "Do you price match?",
    "Can I pick up in store?", "Is my data safe?", "How do I reset my password?",
    "Where can I see my invoice?", "Can I split a payment?",
]  # fmt: skip


async def ttft(client: httpx.AsyncClient, url: str, question: str) -> tuple[float, int]:
    body = {
        "model": DEFAULT_SERVED_NAME,
        "messages": [
            {"role": "system", "content": shared_prefix()},
            {"role": "user", "content": question},
        ],
        "temperature": 0,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    prompt_tokens = 0
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"cache-control": "no-store"}
    ) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
            choices = event.get("choices") or []
            if first is None and choices and choices[0].get("delta", {}).get("content"):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("no content in the stream")
    return first, prompt_tokens


def start_gateway(engine_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env.update(STRATA_REDIS_ENABLED="false", STRATA_LOG_LEVEL="warning")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--engine-url", engine_url, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gateway did not start")


async def measure(label: str, spec: LaunchSpec, requests: int) -> dict[str, object]:
    supervisor = EngineSupervisor(spec, start_timeout=900)
    started = time.monotonic()
    await supervisor.start()
    print(f"[ttft] engine ({label}) up in {time.monotonic() - started:.0f} s", flush=True)
    gateway, url = start_gateway(supervisor.url)
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            warm, prompt_tokens = await ttft(client, url, "Hello!")  # cold: compiles, fills cache
            samples = []
            for question in QUESTIONS[:requests]:
                seconds, prompt_tokens = await ttft(client, url, question)
                samples.append(seconds)
                print(f"[ttft] {label}: {seconds * 1000:7.1f} ms  ({question})", flush=True)
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        await supervisor.stop()
    return {
        "label": label,
        "prompt_tokens": prompt_tokens,
        "first_ms": warm * 1000,
        "p50_ms": statistics.median(samples) * 1000,
        "mean_ms": statistics.fmean(samples) * 1000,
        "min_ms": min(samples) * 1000,
        "max_ms": max(samples) * 1000,
        "samples_ms": [round(s * 1000, 1) for s in samples],
    }


def table(rows: list[dict[str, object]], ratio: float, requests: int) -> str:
    lines = [
        "| prefix caching | prompt tokens | first request ms | TTFT p50 ms | mean ms | min ms "
        "| max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['prompt_tokens']} | {row['first_ms']:.0f} | "
            f"{row['p50_ms']:.0f} | {row['mean_ms']:.0f} | {row['min_ms']:.0f} | "
            f"{row['max_ms']:.0f} |"
        )
    verdict = "PASS" if ratio <= 0.5 else "FAIL"
    lines += [
        "",
        f"- {requests} requests per engine after one cold request, sequential, streamed through "
        "Strata with `Cache-Control: no-store`",
        f"- TTFT p50 with prefix caching / without: **{ratio:.2f}** (target <= 0.50): {verdict}",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    python = args.engine_python or str(ROOT / ".venv-engine" / "bin" / "python")
    data_dir = Path(args.data_dir)
    model = str(prepare_default_model(python, default_model_dir(data_dir)))
    rows = []
    for label, extra in (("on", ()), ("off", ("--no-enable-prefix-caching",))):
        spec = LaunchSpec(
            python=python, model=model, served_model_name=DEFAULT_SERVED_NAME, device="cpu",
            port=free_port(), max_model_len=4096, cpu_kv_cache_gib=1, extra_args=extra,
            log_path=data_dir / "logs" / f"bench-ttft-{label}.log",
        )  # fmt: skip
        rows.append(await measure(label, spec, args.requests))
    ratio = float(rows[0]["p50_ms"]) / float(rows[1]["p50_ms"])  # type: ignore[arg-type]
    text = table(rows, ratio, args.requests)
    print(text)
    print(json.dumps({"ratio": ratio, "rows": rows}))
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--engine-python", help="interpreter with vLLM (default .venv-engine)")
    parser.add_argument("--data-dir", default=str(ROOT / ".run"))
    parser.add_argument("--out", type=Path)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
