"""Cache layers and their composition. Depends only on `config`; knows nothing of HTTP."""

from caches.base import CachedResponse, CacheError, CacheKey, CacheLayer, CacheStats
from caches.chain import CacheChain, LayerReport, Lookup
from caches.keys import build_key
from caches.memory import MemoryCache
from caches.policy import (
    CacheControl,
    ControlError,
    Decision,
    decide,
    parse_cache_control,
    storable,
    usage_tokens,
)
from caches.redis_cache import RedisCache

__all__ = [
    "CacheChain",
    "CacheControl",
    "CacheError",
    "CacheKey",
    "CacheLayer",
    "CacheStats",
    "CachedResponse",
    "ControlError",
    "Decision",
    "LayerReport",
    "Lookup",
    "MemoryCache",
    "RedisCache",
    "build_key",
    "decide",
    "parse_cache_control",
    "storable",
    "usage_tokens",
]
