"""The HTTP gateway: composes `caches` and `engine` behind an OpenAI-compatible API."""

from gateway.app import build_chain, build_engine, create_app

__all__ = ["build_chain", "build_engine", "create_app"]
