"""`strata cache stats`, `invalidate` and `forget` against a gateway served on a real socket:
an aligned table with a row per layer, the admin API's JSON with `--json`, what each command did
in one line, and one `strata: ...` line with status 1 when the gateway cannot be reached or
refuses the request."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.stats_table import human_bytes, render
from tests.asgi_server import served
from tests.gateway.harness import chat_body, gateway
from tests.redisproc import free_port


@pytest.fixture(autouse=True)
def no_remote_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STRATA_URL", "STRATA_ADMIN_KEY", "STRATA_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())  # columns are two spaces apart at least


async def strata(*argv: str) -> int:
    # In a thread: the command is synchronous and the gateway answers on this event loop.
    return await asyncio.to_thread(main, list(argv))


async def test_stats_prints_a_row_per_layer_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    async with gateway(admin_key="s3cret") as gw:
        await gw.chat()
        await gw.chain.settle()
        await gw.chat()  # an L1 hit
        async with served(gw.app) as url:
            assert await strata("cache", "stats", "--url", url, "--admin-key", "s3cret") == 0
            table = capsys.readouterr().out
            args = ("cache", "stats", "--url", url, "--admin-key", "s3cret", "--json")
            assert await strata(*args) == 0
            raw = capsys.readouterr().out
    lines = table.splitlines()
    assert cells(lines[0]) == [
        "layer", "entries", "bytes", "hits", "misses", "errors", "hit ratio",
        "prompt saved", "completion saved",
    ]  # fmt: skip
    rows = {cells(line)[0]: cells(line) for line in lines[1:]}
    assert list(rows) == ["l1", "l2", "coalesced"]
    assert rows["l1"][1] == "1"
    assert rows["l1"][2].endswith(" B")
    assert rows["l1"][3:7] == ["1", "1", "0", "50.0%"]  # hits, misses, errors, hit ratio
    assert rows["l2"][3:7] == ["0", "1", "0", "0.0%"]  # the miss went on to L2
    # Right-aligned: every row's hit-ratio cell ends where its heading does.
    end = lines[0].index("hit ratio") + len("hit ratio")
    assert all(line[:end].endswith(cells(line)[6]) for line in lines[1:])
    stats = json.loads(raw)
    l1 = stats["layers"][0]
    assert (l1["layer"], l1["hits"], l1["hit_ratio"]) == ("l1", 1, 0.5)
    assert rows["l1"][7] == f"{l1['tokens_saved']['prompt']:,}"


async def test_a_refused_key_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    async with gateway(admin_key="s3cret") as gw, served(gw.app) as url:
        with pytest.raises(SystemExit) as exited:
            await strata("cache", "stats", "--url", url, "--admin-key", "wrong")
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("strata: HTTP 401: ")
    assert len(err.splitlines()) == 1
    assert "wrong" not in err


def test_an_unreachable_gateway_is_one_line_and_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exited:
        main(["cache", "stats", "--url", url])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"strata: cannot reach the gateway at {url}")


def test_the_table_marks_unknown_and_unavailable_values() -> None:
    saved = {"prompt": 1200, "completion": 34}
    l1 = {"layer": "l1", "entries": 3, "bytes": 5000, "hits": 2, "misses": 1, "errors": 0,
          "hit_ratio": 2 / 3, "tokens_saved": saved, "available": True}  # fmt: skip
    l2 = {"layer": "l2", "entries": None, "bytes": None, "hits": 0, "misses": 0, "errors": 0,
          "hit_ratio": None, "tokens_saved": saved, "available": False}  # fmt: skip
    coalesced = {"answers": 0, "tokens_saved": {"prompt": 0, "completion": 0}}
    stats = {"layers": [l1, l2], "coalesced": coalesced}
    lines = render(stats).splitlines()
    assert cells(lines[1]) == ["l1", "3", "4.9 KiB", "2", "1", "0", "66.7%", "1,200", "34"]
    assert cells(lines[2])[:3] == ["l2 (unavailable)", "-", "-"]
    assert cells(lines[2])[6] == "-"  # no lookups, no ratio
    with pytest.raises(ValueError, match="expected shape"):
        render({"layers": [{"layer": "l1"}]})


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5 * 2**20, "5.0 MiB"),
     (3 * 2**40, "3072.0 GiB")],
)  # fmt: skip
def test_human_bytes(size: int | None, text: str) -> None:
    assert human_bytes(size) == text


async def test_invalidate_and_forget_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = {"team-a": "sk-team-a-0001"}
    team_a = {"authorization": "Bearer sk-team-a-0001"}
    request = chat_body("forget me")
    saved = tmp_path / "bad.json"
    saved.write_text(json.dumps(request))
    async with gateway(admin_key="s3cret", api_keys=keys) as gw, served(gw.app) as url:
        admin = ("--url", url, "--admin-key", "s3cret")
        await gw.chat(headers=team_a)
        assert await strata("cache", "invalidate", "--tenant", "team-a", *admin) == 0
        said = capsys.readouterr().out
        assert (await gw.chat(headers=team_a)).headers["x-strata-cache"] == "miss"

        await gw.chat(request, headers=team_a)
        assert (await gw.chat(request, headers=team_a)).headers["x-strata-cache"] == "hit"
        args = ("cache", "forget", str(saved), "--api-key", "sk-team-a-0001", *admin)
        assert await strata(*args) == 0
        forgot = capsys.readouterr().out
        assert (await gw.chat(request, headers=team_a)).headers["x-strata-cache"] == "miss"

        with pytest.raises(SystemExit) as exited:
            await strata("cache", "invalidate", "--tenant", "nobody", *admin)
    assert said == "invalidated tenant 'team-a': generation 1, on every replica\n"
    assert forgot.startswith("forgot entry ")
    assert "removed from 2 layer(s)" in forgot
    assert exited.value.code == 1
    assert "No tenant named 'nobody'" in capsys.readouterr().err
