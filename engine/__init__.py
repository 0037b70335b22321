"""Talking to (and, later, launching) the inference engine. Depends only on `config`."""

from engine.client import EngineClient, EngineResponse, map_transport_error
from engine.errors import (
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    upstream_error,
)

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineProtocolError",
    "EngineResponse",
    "EngineTimeout",
    "EngineUnavailable",
    "map_transport_error",
    "upstream_error",
]
