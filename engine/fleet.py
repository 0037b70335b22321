"""Several launched vLLM replicas on one machine, each with resources of its own.

Guarantees:
- `replica_specs` turns one `LaunchSpec` into N: consecutive ports from the spec's, a log file
  each (`vllm-PORT.log` beside the spec's), and on CPU a contiguous, disjoint share of the cores
  for each replica's compute threads (`VLLM_CPU_OMP_THREADS_BIND`; shares differ by at most one
  core) with a KV cache of its own (`VLLM_CPU_KVCACHE_SPACE` each), on GPU one device each
  (`CUDA_VISIBLE_DEVICES`). More replicas than cores or GPUs is an error, found before anything
  starts.
- `EngineFleet.start` starts every replica at once and returns when all are healthy; if one
  cannot be started, the others are stopped and the error is that replica's. `stop` stops all of
  them. Each replica is its own `EngineSupervisor`, restarted on its own when it exits.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from dataclasses import replace

from engine.launcher import EngineLaunchError, EngineSupervisor, LaunchSpec

_CORES = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_cores(text: str) -> list[int]:
    """The cores in a Linux CPU list ("0-3,6"), sorted, without repeats."""
    text = text.strip()
    if not _CORES.match(text):
        raise ValueError(f"not a CPU list: {text!r} (try 0-3,6)")
    cores: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise ValueError(f"not a CPU range: {part!r}")
        cores.update(range(low, high + 1))
    return sorted(cores)


def cpu_list(cores: Sequence[int]) -> str:
    """The shortest Linux CPU list for `cores` ("0-3,6"), as vLLM's thread binding reads it."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    start = prev = ordered[0]
    for core in [*ordered[1:], None]:
        if core is not None and core == prev + 1:
            prev = core
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if core is not None:
            start = prev = core
    return ",".join(parts)


def split_cores(cores: Sequence[int], count: int) -> list[list[int]]:
    """`cores` in `count` contiguous shares, the first ones one core larger when they do not
    divide evenly."""
    ordered = sorted(set(cores))
    if count < 1 or len(ordered) < count:
        raise ValueError(f"{count} engine replicas need at least {count} CPU cores; {len(ordered)}")
    size, extra = divmod(len(ordered), count)
    shares, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        shares.append(ordered[start:end])
        start = end
    return shares


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which containers set)."""
    return sorted(os.sched_getaffinity(0))


def visible_gpus(count: int, environ: dict[str, str] | None = None) -> list[str]:
    """One GPU for each of `count` replicas: the i-th of CUDA_VISIBLE_DEVICES when it is set,
    else device i. More replicas than listed devices is an error."""
    listed = (environ if environ is not None else dict(os.environ)).get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    devices = [d.strip() for d in listed.split(",") if d.strip()]
    if len(devices) < count:
        raise ValueError(
            f"{count} engine replicas need {count} GPUs; CUDA_VISIBLE_DEVICES={listed}"
        )
    return devices[:count]


def replica_specs(
    spec: LaunchSpec,
    count: int,
    *,
    cores: Sequence[int] | None = None,
    gpus: Sequence[str] | None = None,
) -> list[LaunchSpec]:
    """`count` replicas of `spec` with their own port, log, cores (CPU) or GPU (GPU)."""
    if spec.port + count - 1 > 65535:
        raise ValueError("not enough ports above the first engine's")
    shares: list[str | None] = [None] * count
    devices: list[str | None] = [None] * count
    if spec.device == "cpu":
        shares = [cpu_list(share) for share in split_cores(cores or available_cores(), count)]
    else:
        devices = list(gpus if gpus is not None else visible_gpus(count))
        if len(devices) < count:
            raise ValueError(f"{count} engine replicas need {count} GPUs; {len(devices)} given")
    specs = []
    for i in range(count):
        port = spec.port + i
        log_path = spec.log_path.parent / f"vllm-{port}.log"
        specs.append(
            replace(spec, port=port, log_path=log_path, cpu_cores=shares[i], gpus=devices[i])
        )
    return specs


class EngineFleet:
    """Owns N `EngineSupervisor`s: started together, stopped together."""

    def __init__(self, supervisors: Sequence[EngineSupervisor]) -> None:
        if not supervisors:
            raise ValueError("a fleet needs at least one engine")
        self.supervisors = list(supervisors)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.supervisors]

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.supervisors)

    async def start(self) -> None:
        results = await asyncio.gather(
            *(s.start() for s in self.supervisors), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            first = failures[0]
            if isinstance(first, EngineLaunchError):
                raise first
            raise EngineLaunchError(f"an engine replica could not be started: {first!r}") from first

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.supervisors))
