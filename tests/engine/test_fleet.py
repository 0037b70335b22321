"""Launched replicas: each with its own port, log, cores or GPU, started and stopped together."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from engine.fleet import (
    EngineFleet,
    cpu_list,
    parse_cores,
    replica_specs,
    split_cores,
    visible_gpus,
)
from engine.launcher import EngineLaunchError, EngineSupervisor, LaunchSpec
from tests.engine.test_launcher import serving, stand_in_vllm  # noqa: F401 - a fixture
from tests.redisproc import free_port


@pytest.mark.parametrize(
    ("text", "cores"),
    [
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("0-1,4,6-7", [0, 1, 4, 6, 7]),
        ("3,1,1-2", [1, 2, 3]),
    ],
)
def test_parse_cores(text: str, cores: list[int]) -> None:
    assert parse_cores(text) == cores


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "0;1", "-2"])
def test_parse_cores_refuses_what_is_not_a_cpu_list(text: str) -> None:
    with pytest.raises(ValueError, match="CPU"):
        parse_cores(text)


@pytest.mark.parametrize(
    ("cores", "text"),
    [([0], "0"), ([0, 1, 2, 3], "0-3"), ([0, 1, 4, 6, 7], "0-1,4,6-7"), ([5, 3, 4], "3-5")],
)
def test_cpu_list(cores: list[int], text: str) -> None:
    assert cpu_list(cores) == text


@pytest.mark.parametrize(
    ("cores", "count", "shares"),
    [
        ([0, 1], 2, [[0], [1]]),
        ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
        ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]),
        ([0, 1, 2, 3, 4, 5, 6], 3, [[0, 1, 2], [3, 4], [5, 6]]),
        ([0, 2, 4, 6], 4, [[0], [2], [4], [6]]),
        ([0, 1, 2], 1, [[0, 1, 2]]),
    ],
)
def test_split_cores_gives_disjoint_contiguous_shares(
    cores: list[int], count: int, shares: list[list[int]]
) -> None:
    assert split_cores(cores, count) == shares


def test_more_replicas_than_cores_or_gpus_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 3 CPU cores"):
        split_cores([0, 1], 3)
    with pytest.raises(ValueError, match="3 GPUs"):
        visible_gpus(3, {"CUDA_VISIBLE_DEVICES": "4,5"})


@pytest.mark.parametrize(
    ("environ", "gpus"),
    [({}, ["0", "1"]), ({"CUDA_VISIBLE_DEVICES": "2, 3,5"}, ["2", "3"])],
)
def test_visible_gpus(environ: dict[str, str], gpus: list[str]) -> None:
    assert visible_gpus(2, environ) == gpus


def base_spec(tmp_path: Path, device: str = "cpu", **kw: object) -> LaunchSpec:
    return LaunchSpec(
        python=sys.executable, model="some/model", served_model_name="served",
        device=device, port=8100, log_path=tmp_path / "logs" / "vllm-8100.log", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_cpu_replicas_get_their_own_port_log_cores_and_kv_cache(tmp_path: Path) -> None:
    specs = replica_specs(base_spec(tmp_path, cpu_kv_cache_gib=3), 2, cores=[0, 1, 2, 3])
    assert [s.port for s in specs] == [8100, 8101]
    assert [s.log_path.name for s in specs] == ["vllm-8100.log", "vllm-8101.log"]
    envs = [s.environment({}) for s in specs]
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in envs] == ["0-1", "2-3"]
    assert [e["VLLM_CPU_KVCACHE_SPACE"] for e in envs] == ["3", "3"]  # each its own
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in envs)


def test_gpu_replicas_get_one_device_each(tmp_path: Path) -> None:
    specs = replica_specs(base_spec(tmp_path, device="gpu"), 2, gpus=["4", "7"])
    envs = [s.environment({}) for s in specs]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "7"]
    assert all("VLLM_CPU_OMP_THREADS_BIND" not in e for e in envs)
    with pytest.raises(ValueError, match="GPUs"):
        replica_specs(base_spec(tmp_path, device="gpu"), 3, gpus=["0", "1"])


def fleet_specs(tmp_path: Path, count: int) -> list[LaunchSpec]:
    spec = replace(base_spec(tmp_path), port=free_port())
    return [replace(s, port=free_port()) for s in replica_specs(spec, count, cores=[0, 1])]


@pytest.mark.usefixtures("stand_in_vllm")
async def test_a_fleet_starts_and_stops_every_replica(tmp_path: Path) -> None:
    fleet = EngineFleet([EngineSupervisor(s, start_timeout=30) for s in fleet_specs(tmp_path, 2)])
    await fleet.start()
    try:
        assert [await serving(url) for url in fleet.urls] == [True, True]
    finally:
        await fleet.stop()
    assert [await serving(url) for url in fleet.urls] == [False, False]


@pytest.mark.usefixtures("stand_in_vllm")
async def test_a_replica_that_cannot_start_stops_the_others(tmp_path: Path) -> None:
    good, bad = fleet_specs(tmp_path, 2)
    fleet = EngineFleet(
        [
            EngineSupervisor(good, start_timeout=30),
            EngineSupervisor(replace(bad, model="crash"), start_timeout=30),
        ]
    )
    with pytest.raises(EngineLaunchError, match="exited with code 3"):
        await fleet.start()
    assert not await serving(good.url)
