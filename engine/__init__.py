"""Talking to (and, later, launching) the inference engine. Depends only on `config`."""

from engine.client import EngineClient, EngineResponse
from engine.errors import (
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    upstream_error,
)
from engine.httpx_transport import map_transport_error
from engine.transport import Timeouts, UpstreamResponse

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineProtocolError",
    "EngineResponse",
    "EngineTimeout",
    "EngineUnavailable",
    "Timeouts",
    "UpstreamResponse",
    "map_transport_error",
    "upstream_error",
]
