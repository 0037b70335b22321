"""Talking to (and, later, launching) the inference engine. Depends only on `config`."""

from engine.client import Engine, EngineClient, EngineResponse
from engine.errors import (
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    upstream_error,
)
from engine.httpx_transport import map_transport_error
from engine.pool import EnginePool
from engine.transport import Timeouts, UpstreamResponse

__all__ = [
    "Engine",
    "EngineClient",
    "EngineError",
    "EnginePool",
    "EngineProtocolError",
    "EngineResponse",
    "EngineTimeout",
    "EngineUnavailable",
    "Timeouts",
    "UpstreamResponse",
    "map_transport_error",
    "upstream_error",
]
