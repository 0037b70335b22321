"""The engine supervisor with a stand-in vLLM: start, health, crash and restart, timeout, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from engine.launcher import EngineLaunchError, EngineSupervisor, LaunchSpec
from tests.redisproc import free_port

ROOT = Path(__file__).resolve().parents[2]

STAND_IN = """\
import argparse, sys, time
parser = argparse.ArgumentParser()
for flag in ("--port", "--host", "--model", "--served-model-name"):
    parser.add_argument(flag)
args, _ = parser.parse_known_args()
print("stand-in vLLM", sys.argv[1:], flush=True)
if args.model == "crash":
    print("ValueError: no such model", flush=True)
    sys.exit(3)
if args.model == "hang":
    time.sleep(3600)
from engine.fake import main
main(["--port", args.port, "--model", args.served_model_name])
"""


@pytest.fixture
def stand_in_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", package):
        (folder / "__init__.py").write_text("")
    (package / "api_server.py").write_text(STAND_IN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    return tmp_path


def spec(tmp_path: Path, model: str = "some/model", **kw: object) -> LaunchSpec:
    return LaunchSpec(
        python=sys.executable, model=model, served_model_name="served", device="cpu",
        port=free_port(), cpu_kv_cache_gib=3, log_path=tmp_path / "vllm.log", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_command_line_and_environment(tmp_path: Path) -> None:
    cpu = spec(tmp_path, max_model_len=2048, dtype="bfloat16", block_size=16,
               extra_args=("--seed", "1"))  # fmt: skip
    argv = cpu.argv()
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--enable-prefix-caching", "--enable-prompt-tokens-details"):
        assert flag in argv
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert argv[argv.index("--block-size") + 1] == "16"
    assert argv[-2:] == ["--seed", "1"]
    assert "--gpu-memory-utilization" not in argv
    default_cpu = spec(tmp_path).argv()
    assert default_cpu[default_cpu.index("--dtype") + 1] == "float32"
    env = cpu.environment({})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["HF_HUB_OFFLINE"] == "1"
    gpu = LaunchSpec(python="python", model="m", served_model_name="m", device="gpu",
                     gpu_memory_utilization=0.8, offline=False)  # fmt: skip
    assert gpu.argv()[gpu.argv().index("--gpu-memory-utilization") + 1] == "0.8"
    assert "--dtype" not in gpu.argv()  # vLLM's own choice on GPU
    assert "VLLM_CPU_KVCACHE_SPACE" not in gpu.environment({})
    assert "HF_HUB_OFFLINE" not in gpu.environment({})


async def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def serving(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(url + "/v1/models")).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.usefixtures("stand_in_vllm")
async def test_start_crash_restart_stop(tmp_path: Path) -> None:
    supervisor = EngineSupervisor(spec(tmp_path), start_timeout=30, max_backoff=0.2)
    await supervisor.start()
    try:
        async with httpx.AsyncClient() as client:
            models = (await client.get(supervisor.url + "/v1/models")).json()
        assert models["data"][0]["id"] == "served"
        first_pid = supervisor.pid
        assert first_pid is not None
        os.killpg(first_pid, signal.SIGKILL)  # the engine dies under us

        async def restarted() -> bool:
            return supervisor.restarts == 1 and await serving(supervisor.url)

        await wait_for(restarted)
        assert supervisor.pid != first_pid
    finally:
        await supervisor.stop()
    assert not await serving(supervisor.url)
    with pytest.raises(ProcessLookupError):
        os.killpg(first_pid, 0)


@pytest.mark.usefixtures("stand_in_vllm")
async def test_engine_that_exits_at_start_is_a_clear_error(tmp_path: Path) -> None:
    supervisor = EngineSupervisor(spec(tmp_path, model="crash"), start_timeout=30)
    with pytest.raises(EngineLaunchError) as info:
        await supervisor.start()
    message = str(info.value)
    assert "exited with code 3" in message
    assert "ValueError: no such model" in message  # vLLM's own last words


@pytest.mark.usefixtures("stand_in_vllm")
async def test_engine_that_never_gets_healthy_times_out_and_is_killed(tmp_path: Path) -> None:
    supervisor = EngineSupervisor(
        spec(tmp_path, model="hang"), start_timeout=1.5, stop_grace=1.0, poll_interval=0.1
    )
    with pytest.raises(EngineLaunchError, match="did not become healthy within 2 s"):
        await supervisor.start()
    log = (tmp_path / "vllm.log").read_text()
    assert "stand-in vLLM" in log


GATEWAY = """\
import asyncio, sys
from engine.launcher import EngineSupervisor, LaunchSpec
from pathlib import Path

async def main():
    spec = LaunchSpec(python=sys.executable, model="m", served_model_name="served", device="cpu",
                      port=int(sys.argv[1]), log_path=Path(sys.argv[2]))
    supervisor = EngineSupervisor(spec, start_timeout=60)
    await supervisor.start()
    print(supervisor.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.usefixtures("stand_in_vllm")
async def test_the_engine_ends_when_the_gateway_is_killed(tmp_path: Path) -> None:
    port = free_port()
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GATEWAY, str(port), str(tmp_path / "vllm.log"),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert gateway.stdout is not None
    try:
        engine_pid = int(await asyncio.wait_for(gateway.stdout.readline(), 60))
        assert await serving(f"http://127.0.0.1:{port}")
    finally:
        gateway.kill()  # no shutdown: SIGKILL, as the OOM killer would
        await gateway.wait()

    async def gone() -> bool:
        try:
            stat = Path(f"/proc/{engine_pid}/stat").read_text()
        except FileNotFoundError:
            return True
        return stat.rsplit(")", 1)[1].split()[0] == "Z"  # dead, not yet reaped by init

    await wait_for(gone)
    assert not await serving(f"http://127.0.0.1:{port}")
