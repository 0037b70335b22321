"""The typed state the lifespan hands to every request handler."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from prometheus_client import CollectorRegistry

from caches import CacheChain, RedisCache
from config import Settings
from engine import Engine
from gateway.engine_metrics import EngineMetrics
from gateway.flow import CompletionService


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    engine: Engine
    chain: CacheChain
    service: CompletionService
    registry: CollectorRegistry
    redis: RedisCache | None
    body_limit: int
    engine_metrics: EngineMetrics


def state_of(request: Request) -> AppState:
    state: AppState = request.state.strata
    return state
