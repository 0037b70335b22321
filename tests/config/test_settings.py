"""Settings: sources, precedence, validation, and the CLI's start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from config import CONFIG_ENV, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STRATA_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.default_ttl == 3600
    assert settings.redis_timeout == 0.05
    assert int(settings.max_body_bytes) == 4 * 1024 * 1024
    assert settings.storable_finish_reasons == {"stop", "length", "tool_calls"}


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_ENGINE_URL", "http://engine:8000/")
    monkeypatch.setenv("STRATA_L1_MAX_BYTES", "64MiB")
    monkeypatch.setenv("STRATA_ADMIN_KEY", "hunter2-admin")
    settings = Settings()
    assert settings.engine_url == "http://engine:8000"
    assert int(settings.l1_max_bytes) == 64 * 1024 * 1024
    assert settings.admin_key is not None
    assert "hunter2-admin" not in repr(settings)


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_below_env_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"strata{suffix}"
    if suffix == ".yaml":
        path.write_text("default_ttl: 60\nport: 9001\nredis_timeout: 0.2\n")
    else:
        path.write_text("default_ttl = 60\nport = 9001\nredis_timeout = 0.2\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setenv("STRATA_PORT", "9002")
    settings = load_settings(redis_timeout=0.3, host=None)
    assert settings.default_ttl == 60  # from the file
    assert settings.port == 9002  # env beats file
    assert settings.redis_timeout == 0.3  # flags beat env and file
    assert settings.host == "127.0.0.1"  # an unset flag falls through


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("engine_url", "engine:8000"),
        ("redis_url", "http://redis"),
        ("default_ttl", 0),
        ("redis_timeout", 0),
        ("port", 70000),
        ("l1_max_entries", -1),
        ("max_body_bytes", "lots"),
        ("storable_finish_reasons", ["stop", "content_filter"]),
        ("no_such_setting", 1),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    assert field in str(info.value)


def test_default_ttl_cannot_exceed_max_ttl() -> None:
    with pytest.raises(ValidationError, match="default_ttl"):
        Settings(default_ttl=100, max_ttl=10)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redis_url", "http://user:hunter2-secret@redis.internal:6379/0"),
        ("redis_url", "redis+sentinel://:hunter2-secret@127.0.0.1:26379"),
        ("engine_api_key", {"not": "hunter2-secret"}),
    ],
)
def test_errors_never_repeat_the_value_given(field: str, value: object) -> None:
    # A URL or key in a start-up error would land in logs and CI output.
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value})
    assert field in str(caught.value)
    assert "hunter2-secret" not in str(caught.value)


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError):
        Settings()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


def test_cli_rejects_bad_configuration_before_starting() -> None:
    result = run_cli("serve", "--engine-url", "ftp://x", env={"STRATA_REDIS_TIMEOUT": "-1"})
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "engine_url" in result.stderr
    assert "redis_timeout" in result.stderr


def test_cli_help_lists_serve() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout


def test_api_keys_from_a_file_are_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"team-b": "sk-team-b-0002"}))
    monkeypatch.setenv("STRATA_API_KEYS", json.dumps({"team-a": "sk-team-a-0001"}))
    monkeypatch.setenv("STRATA_API_KEYS_FILE", str(keys))
    settings = Settings()
    assert {t: k.get_secret_value() for t, k in settings.api_keys.items()} == {
        "team-a": "sk-team-a-0001",
        "team-b": "sk-team-b-0002",
    }
    assert "sk-team" not in repr(settings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "api_keys_file"),
        ('["a list"]', "JSON object of tenant: key"),
        ('{"team-a": "sk-other-0003"}', "both in api_keys and api_keys_file"),
        ('{"team-c": "short"}', "at least 8 characters"),
    ],
)
def test_a_bad_api_keys_file_fails_at_start(tmp_path: Path, content: str, message: str) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(content)
    with pytest.raises(ValidationError, match=message):
        Settings(api_keys={"team-a": "sk-team-a-0001"}, api_keys_file=keys)


def test_a_missing_api_keys_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="api_keys_file"):
        Settings(api_keys_file=tmp_path / "nowhere.json")


# --- TTL rules --------------------------------------------------------------------------------


def test_ttl_rules_from_the_environment_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = [
        {"name": "news", "ttl": 60, "pattern": r"(?i)\bnews\b"},
        {"name": "batch", "ttl": 86400, "header": "X-Job-Kind", "header_value": "^batch$"},
    ]
    monkeypatch.setenv("STRATA_TTL_RULES", json.dumps(rules))
    settings = Settings()
    assert [(r.name, r.ttl) for r in settings.ttl_rules] == [("news", 60), ("batch", 86400)]
    assert settings.ttl_rules[1].header == "X-Job-Kind"


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_ttl_rules_from_a_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    path = tmp_path / f"strata{suffix}"
    if suffix == ".yaml":
        path.write_text(
            "ttl_rules:\n"
            "  - {name: team-a, ttl: 120, tenant: team-a, model: 'llama-*'}\n"
            "  - {name: weather, ttl: 60, pattern: '(?i)weather'}\n"
        )
    else:
        path.write_text(
            "[[ttl_rules]]\nname = 'team-a'\nttl = 120\ntenant = 'team-a'\nmodel = 'llama-*'\n"
            "[[ttl_rules]]\nname = 'weather'\nttl = 60\npattern = '(?i)weather'\n"
        )
    monkeypatch.setenv(CONFIG_ENV, str(path))
    rules = Settings().ttl_rules
    assert [(r.name, r.ttl, r.tenant, r.model) for r in rules] == [
        ("team-a", 120, "team-a", "llama-*"),
        ("weather", 60, None, None),
    ]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        pytest.param([{"name": "a", "ttl": 5, "pattern": "(unclosed"}], "pattern", id="bad-regex"),
        pytest.param(
            [{"name": "a", "ttl": 5, "header": "x", "header_value": "["}],
            "header_value",
            id="bad-header-regex",
        ),
        pytest.param([{"name": "a", "ttl": 5}, {"name": "a", "ttl": 6}], "unique", id="duplicate"),
        pytest.param([{"name": "a", "ttl": 0}], "ttl", id="ttl-below-1"),
        pytest.param([{"name": "a", "ttl": 100}], "exceeds max_ttl", id="ttl-above-max"),
        pytest.param([{"name": "default", "ttl": 5}], "reserved", id="reserved-name"),
        pytest.param([{"name": "a b", "ttl": 5}], "name", id="name-not-a-header-token"),
        pytest.param([{"name": "a", "ttl": 5, "header_value": "x"}], "needs a header", id="value"),
        pytest.param([{"name": "a", "ttl": 5, "header": "a b"}], "header", id="bad-header-name"),
        pytest.param([{"name": "a", "ttl": 5, "paterns": "x"}], "paterns", id="unknown-field"),
    ],
)
def test_bad_ttl_rules_fail_at_start_naming_the_field(
    rules: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(ttl_rules=rules, default_ttl=10, max_ttl=10)
    assert "ttl_rules" in str(info.value)
    assert message in str(info.value)


def test_cli_names_a_bad_ttl_rule() -> None:
    rules = json.dumps([{"name": "a", "ttl": 5, "pattern": "("}])
    result = run_cli("serve", "--engine-url", "http://x", env={"STRATA_TTL_RULES": rules})
    assert result.returncode == 2
    assert "ttl_rules.0.pattern" in result.stderr


@pytest.mark.parametrize(
    ("value", "urls"),
    [
        ("http://a:8000, http://b:8000/", ["http://a:8000", "http://b:8000"]),
        ('["http://a:8000", "http://b:8000"]', ["http://a:8000", "http://b:8000"]),
        ("http://a:8000", ["http://a:8000"]),
    ],
)
def test_engine_urls_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, urls: list[str]
) -> None:
    monkeypatch.setenv("STRATA_ENGINE_URLS", value)
    settings = Settings()
    assert settings.engine_urls == urls
    assert settings.upstream_urls == urls
    assert not settings.launches_engine


@pytest.mark.parametrize(
    ("settings", "urls"),
    [
        ({"engine_url": "http://e:1/"}, ["http://e:1"]),
        ({}, ["http://127.0.0.1:8000"]),
        ({"engines": 3, "engine_port": 9000},
         ["http://127.0.0.1:9000", "http://127.0.0.1:9001", "http://127.0.0.1:9002"]),
    ],
)  # fmt: skip
def test_upstream_urls(settings: dict[str, object], urls: list[str]) -> None:
    assert Settings(**settings).upstream_urls == urls  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"engine_url": "http://a:1", "engine_urls": ["http://b:1"]}, "not both"),
        ({"engine_urls": ["http://a:1", "b:1"]}, "http://"),
        ({"engine_urls": ["http://a:1", "http://a:1/"]}, "twice"),
        ({"engines": 2, "engine_urls": ["http://a:1", "http://b:1"]}, "nothing is launched"),
        ({"engines": 0}, "engines"),
        ({"engines": 2, "engine_port": 65535}, "engine_port"),
        ({"routing_policy": "random"}, "routing_policy"),
        ({"routing_load_factor": 0.9}, "routing_load_factor"),
        ({"routing_load_slack": -1}, "routing_load_slack"),
        ({"routing_block_chars": 0}, "routing_block_chars"),
        ({"routing_max_blocks": 0}, "routing_max_blocks"),
        ({"engine_ejection_window": 0}, "engine_ejection_window"),
        ({"engine_probe_interval": -1}, "engine_probe_interval"),
        ({"engine_cpu_cores": "0-3;5"}, "engine_cpu_cores"),
    ],
)
def test_bad_engine_and_routing_settings_are_refused(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**settings)  # type: ignore[arg-type]


def test_cli_names_conflicting_engine_flags() -> None:
    result = run_cli("serve", "--engine-url", "http://a:1", "--engine-url", "http://b:1",
                     "--engines", "2")  # fmt: skip
    assert result.returncode == 2
    assert "nothing is launched" in result.stderr
