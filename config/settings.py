"""Strata's one settings object.

Guarantees: every tunable lives here, is validated when `Settings` is built (bad values fail at
start-up with the field name in the message), and is read from, in falling precedence, explicit
keyword arguments (the CLI), `STRATA_*` environment variables, an optional YAML/TOML file named by
`STRATA_CONFIG`, and the defaults below. Only the entry point builds it; the rest receive it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from config.redis_url import parse_redis_url

CONFIG_ENV = "STRATA_CONFIG"
FINISH_REASONS = frozenset({"stop", "length", "tool_calls"})
# What `X-Strata-TTL-Rule` says when no rule decided the TTL; no rule may take these names.
RESERVED_RULE_NAMES = frozenset({"default", "client"})


class TTLRuleSetting(BaseModel):
    """One TTL rule (see `caches.ttl_rules`): `ttl` seconds for the requests that meet every
    condition given. Regexes are checked here, so a bad one fails at start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    ttl: int = Field(ge=1, description="seconds, at most max_ttl")
    model: str | None = Field(default=None, min_length=1, description="exact, or a glob")
    tenant: str | None = Field(default=None, min_length=1)
    pattern: str | None = Field(
        default=None, min_length=1, description="regex searched in the last user message"
    )
    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~\-]+$")
    header_value: str | None = Field(default=None, min_length=1, description="regex")

    @field_validator("pattern", "header_value")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value in RESERVED_RULE_NAMES:
            raise ValueError(f"{sorted(RESERVED_RULE_NAMES)} are reserved names")
        return value

    @model_validator(mode="after")
    def _header_pair(self) -> TTLRuleSetting:
        if self.header_value is not None and self.header is None:
            raise ValueError("header_value needs a header")
        return self


class Settings(BaseSettings):
    """Validated configuration for one gateway process."""

    # Errors never repeat what was given: a Redis URL or an API key may carry a secret.
    model_config = SettingsConfigDict(
        env_prefix="STRATA_",
        hide_input_in_errors=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- serving ---
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_body_bytes: ByteSize = Field(default=ByteSize(4 * 1024 * 1024), gt=0)
    max_messages: int = Field(default=1000, ge=1, description="messages per chat request")
    max_content_chars: int = Field(
        default=1_000_000, ge=1, description="text characters in a request's messages or prompt"
    )

    # --- engine: an engine that is already running (set), or one Strata launches (unset) ---
    engine_url: str | None = None
    # Several running replicas of one engine (same model), routed over (`engine.pool`): a list,
    # or in STRATA_ENGINE_URLS comma-separated. Use it or engine_url, not both.
    engine_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    engine_api_key: SecretStr | None = None
    engine_connect_timeout: float = Field(default=5.0, gt=0)
    engine_read_timeout: float = Field(default=600.0, gt=0)
    engine_max_connections: int = Field(default=512, ge=1)
    engine_health_timeout: float = Field(default=2.0, gt=0)
    # Connection failures retried (nothing reached the engine), with jittered backoff.
    engine_retries: int = Field(default=2, ge=0, le=10)
    # Calls in a row that fail without an answer before the engine's breaker opens, and how long
    # it then answers 503 at once before a trial call.
    engine_breaker_threshold: int = Field(default=5, ge=1)
    engine_breaker_cooldown: float = Field(default=2.0, gt=0, description="seconds")
    # vLLM's `cache_salt` per tenant, so tenants cannot share (or time) the prefix cache.
    engine_cache_salt: bool = True
    cache_salt_secret: SecretStr | None = None  # unset: a random secret per process

    # --- launched engine (when engine_url is unset) ---
    engine_model: str | None = None  # unset: the default model, prepared in data_dir
    engine_served_model_name: str | None = None
    engine_device: Literal["auto", "cpu", "gpu"] = "auto"
    engine_host: str = "127.0.0.1"
    engine_port: int = Field(default=8000, ge=1, le=65535)
    engine_python: str | None = None  # interpreter that has vLLM; unset: this one
    engine_max_model_len: int | None = Field(default=None, ge=16)
    engine_dtype: str | None = None
    engine_block_size: int | None = Field(default=None, ge=1)
    engine_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    engine_cpu_kv_cache_gib: int = Field(default=2, ge=1)
    engine_extra_args: list[str] = Field(default_factory=list)
    engine_start_timeout: float = Field(default=900.0, gt=0)
    engine_restart_max_backoff: float = Field(default=30.0, gt=0)
    # Launched replicas, on consecutive ports from engine_port. Each gets its own KV cache
    # (engine_cpu_kv_cache_gib each on CPU), its share of the CPU cores on CPU and one GPU on GPU.
    engines: int = Field(default=1, ge=1, le=64)
    # CPU cores the launched CPU engines split between them, as "0-3,6"; unset: every core this
    # process may run on.
    engine_cpu_cores: str | None = Field(default=None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")

    # --- routing over several engine replicas (see engine.routing) ---
    # prefix: requests sharing their leading prompt blocks go to the same replica (its prefix
    # cache has them), within the load bound; round_robin and least_loaded ignore the prompt.
    routing_policy: Literal["prefix", "round_robin", "least_loaded"] = "prefix"
    # A replica takes at most ceil(c * (requests in flight + 1) / healthy replicas) + slack
    # requests: c bounds a hot prefix under load, the slack keeps a few requests from spilling
    # onto replicas that have not cached their prompt while the engines are far from busy.
    routing_load_factor: float = Field(default=1.25, ge=1.0, le=100.0)
    routing_load_slack: int = Field(default=2, ge=0, le=100_000)
    # The affinity key covers whole KV blocks of the leading prompt, a block approximated as this
    # many characters (16 tokens ~ 64 characters of English), and at most this many blocks.
    routing_block_chars: int = Field(default=64, ge=1, le=65536)
    routing_max_blocks: int = Field(default=16, ge=1, le=4096)
    # A replica that cannot be reached takes no traffic for this long; probes (`/health`, every
    # interval) then bring it back.
    engine_ejection_window: float = Field(default=5.0, gt=0, le=3600, description="seconds")
    engine_probe_interval: float = Field(default=2.0, gt=0, le=3600, description="seconds")
    data_dir: Path = Field(default_factory=lambda: _default_data_dir())  # noqa: PLW0108 - defined below

    # --- tenants: API key per tenant; none configured = one anonymous tenant (local use) ---
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)
    # A JSON object {"tenant": "key", ...} read at start-up, merged with `api_keys` (a tenant
    # named in both is an error): keys kept in a secret file rather than the environment.
    api_keys_file: Path | None = None

    # --- exact cache policy ---
    cache_enabled: bool = True
    default_ttl: int = Field(default=3600, ge=1, description="seconds")
    max_ttl: int = Field(default=30 * 24 * 3600, ge=1, description="cap on X-Strata-TTL, seconds")
    # Tried in order on every cacheable miss; the first that matches sets the TTL, else
    # default_ttl. A client's X-Strata-TTL wins over them. See `caches.ttl_rules`.
    ttl_rules: list[TTLRuleSetting] = Field(default_factory=list)
    model_epoch: str = Field(default="1", min_length=1, max_length=128)
    # Add the engine's fingerprint (served models, weights, tokenizer, chat template) to the
    # epoch, checked every `model_epoch_interval` seconds: a new model never gets old answers.
    model_epoch_auto: bool = True
    model_epoch_interval: float = Field(default=2.0, gt=0, le=3600, description="seconds")
    storable_finish_reasons: frozenset[str] = FINISH_REASONS
    max_entry_bytes: ByteSize = Field(default=ByteSize(2 * 1024 * 1024), gt=0)

    # Concurrent identical cacheable misses wait this long for the first one's answer before
    # asking the engine themselves; 0 turns coalescing off.
    coalesce_wait: float = Field(default=60.0, ge=0, description="seconds")

    # --- L1 ---
    l1_max_entries: int = Field(default=10_000, ge=0, description="0 disables L1")
    l1_max_bytes: ByteSize = Field(default=ByteSize(256 * 1024 * 1024), ge=0)

    # --- L2 ---
    redis_enabled: bool = True
    # One server (redis://, rediss://, unix://), a Redis Cluster (redis+cluster://h:p,h:p) or
    # the master a Sentinel watches (redis+sentinel://h:p,h:p/SERVICE); see config.redis_url.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = Field(default=0.05, gt=0, description="per-operation, seconds")
    redis_max_connections: int = Field(default=256, ge=1)
    redis_key_prefix: str = Field(default="strata", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    # Mirror which L2 keys exist (Redis CLIENT TRACKING, broadcast mode), so that a miss does not
    # wait on a Redis round trip. Off: every L1 miss asks Redis.
    redis_presence: bool = True
    # Failed Redis operations in a row before L2 is skipped (a miss, counted) for the cooldown.
    redis_breaker_threshold: int = Field(default=5, ge=1)
    redis_breaker_cooldown: float = Field(default=1.0, gt=0, description="seconds")

    # --- L3 semantic cache ---
    # auto: on when its packages are installed. Off by default until the verifier meets its
    # acceptance bar (false hits <= 2% at recall >= 45% on held-out pairs; see the README).
    semantic: Literal["auto", "on", "off"] = "off"
    semantic_model: str | None = None  # a sentence-transformers folder; unset: all-MiniLM-L6-v2
    semantic_max_chars: int = Field(default=1000, ge=1)
    semantic_max_entries: int = Field(default=100_000, ge=1)
    semantic_hnsw_threshold: int = Field(default=20_000, ge=2)
    # Cosine floor below which candidates are not even verified; unset: the verifier's own.
    semantic_min_similarity: float | None = Field(default=None, ge=0, le=1)
    semantic_candidates: int = Field(default=4, ge=1, le=64)
    # How long the first lookup waits for others to share its embedding batch. 0: no wait when
    # the model is idle; lookups that arrive while it is busy still go together in the next batch.
    semantic_batch_wait_ms: float = Field(default=0.0, ge=0, le=100)
    semantic_batch_size: int = Field(default=32, ge=1, le=1024)
    # Threads the embedding model computes with; unset: one per core.
    semantic_embed_threads: int | None = Field(default=None, ge=1, le=256)
    # The embedding model's arithmetic; auto: bfloat16 where the CPU has it natively.
    semantic_embed_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Cached questions whose token vectors the verifier keeps at hand (~12 KiB each).
    semantic_token_cache: int = Field(default=2048, ge=0)

    # --- admin ---
    admin_key: SecretStr | None = None

    @field_validator("engine_url")
    @classmethod
    def _engine_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("engine_urls", mode="before")
    @classmethod
    def _engine_url_list(cls, value: Any) -> Any:
        # The environment gives a string: comma-separated URLs, or a JSON list.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("engine_urls")
    @classmethod
    def _engine_urls(cls, value: list[str]) -> list[str]:
        urls = [url.rstrip("/") for url in value]
        if bad := [url for url in urls if not url.startswith(("http://", "https://"))]:
            raise ValueError(f"every URL must start with http:// or https://: {bad}")
        if len(set(urls)) != len(urls):
            raise ValueError("a URL is listed twice")
        return urls

    @model_validator(mode="after")
    def _engine_choice(self) -> Settings:
        if self.engine_url is not None and self.engine_urls:
            raise ValueError("set engine_url or engine_urls, not both")
        if self.engines > 1 and not self.launches_engine:
            raise ValueError(
                "engines launches replicas; with engine_url(s) set nothing is launched"
            )
        if self.engine_port + self.engines - 1 > 65535:
            raise ValueError("engine_port + engines - 1 must be a port (<= 65535)")
        return self

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        secrets = [key.get_secret_value() for key in value.values()]
        if any(len(key) < 8 for key in secrets):
            raise ValueError("every API key needs at least 8 characters")
        if len(set(secrets)) != len(secrets):
            raise ValueError("two tenants share an API key")
        if any(not tenant for tenant in value):
            raise ValueError("tenant names must not be empty")
        return value

    @property
    def launches_engine(self) -> bool:
        return self.engine_url is None and not self.engine_urls

    @property
    def upstream_url(self) -> str:
        """The (first) engine the gateway talks to: the configured one, or the one it launches."""
        return self.upstream_urls[0]

    @property
    def upstream_urls(self) -> list[str]:
        """Every engine replica the gateway talks to: the configured ones, or those it launches
        (on consecutive ports from engine_port)."""
        if self.engine_urls:
            return list(self.engine_urls)
        if self.engine_url is not None:
            return [self.engine_url]
        return [f"http://{self.engine_host}:{self.engine_port + i}" for i in range(self.engines)]

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        parse_redis_url(value)  # raises ValueError saying what is wrong
        return value

    @field_validator("storable_finish_reasons")
    @classmethod
    def _finish_reasons(cls, value: frozenset[str]) -> frozenset[str]:
        unknown = value - FINISH_REASONS
        if unknown:
            raise ValueError(
                f"only complete answers can be stored; unknown finish reasons {sorted(unknown)}"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _keys_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("api_keys_file"):
            return data
        path = Path(data["api_keys_file"])
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"api_keys_file {path}: {exc}") from None
        if not isinstance(loaded, dict) or not all(
            isinstance(t, str) and isinstance(k, str) for t, k in loaded.items()
        ):
            raise ValueError(f"api_keys_file {path}: must hold a JSON object of tenant: key")
        keys = dict(data.get("api_keys") or {})
        if both := sorted(set(keys) & set(loaded)):
            raise ValueError(f"tenants both in api_keys and api_keys_file: {both}")
        return {**data, "api_keys": {**keys, **loaded}}

    @field_validator("ttl_rules")
    @classmethod
    def _unique_rules(cls, value: list[TTLRuleSetting]) -> list[TTLRuleSetting]:
        names = [rule.name for rule in value]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"rule names must be unique; repeated: {twice}")
        return value

    @model_validator(mode="after")
    def _rules_within_max_ttl(self) -> Settings:
        for i, rule in enumerate(self.ttl_rules):
            if rule.ttl > self.max_ttl:
                raise ValueError(
                    f"ttl_rules[{i}] ({rule.name}): ttl {rule.ttl} exceeds max_ttl {self.max_ttl}"
                )
        return self

    @model_validator(mode="after")
    def _ttl_order(self) -> Settings:
        if self.default_ttl > self.max_ttl:
            raise ValueError("default_ttl must not exceed max_ttl")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get(CONFIG_ENV)
        if path:
            sources.append(_file_source(settings_cls, Path(path)))
        return tuple(sources)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "strata"


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_ENV}={path}: no such file")
    suffix = path.suffix.lower()
    if suffix in {".yaml", ".yml"}:
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    raise ValueError(f"{CONFIG_ENV}={path}: use a .yaml, .yml or .toml file")


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment and config file, with `overrides` taking precedence.

    `None` overrides are dropped so that unset CLI flags fall through to the environment.
    """
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
