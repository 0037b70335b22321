"""Redis URLs: every form `config.redis_url` reads, and the bad ones it refuses with a reason."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from config import Settings
from config.redis_url import RedisTarget, parse_redis_url

SECRET = "s3cr%2Ft"  # percent-escaped "s3cr/t"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("redis://127.0.0.1:6379/0", {"kind": "single", "nodes": ()}, id="single"),
        pytest.param("rediss://h:6380/2", {"kind": "single"}, id="single-tls"),
        pytest.param("unix:///run/redis.sock", {"kind": "single"}, id="unix"),
        pytest.param(
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
            {
                "kind": "cluster",
                "nodes": (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
                "tls": False,
                "db": 0,
                "service": None,
            },
            id="cluster",
        ),
        pytest.param(
            "redis+cluster://node-a", {"nodes": (("node-a", 6379),)}, id="cluster-default-port"
        ),
        pytest.param("redis+cluster://a:1/", {"nodes": (("a", 1),)}, id="cluster-trailing-slash"),
        pytest.param("redis+cluster://a:1/0", {"db": 0}, id="cluster-db-0"),
        pytest.param(
            f"rediss+cluster://app:{SECRET}@a:7000?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional",
            {
                "kind": "cluster",
                "tls": True,
                "username": "app",
                "password": "s3cr/t",
                "options": {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": "optional"},
            },
            id="cluster-tls-auth-options",
        ),
        pytest.param(
            "redis+cluster://[::1]:7000,[fe80::2]",
            {"nodes": (("::1", 7000), ("fe80::2", 6379))},
            id="cluster-ipv6",
        ),
        pytest.param(
            "redis+cluster://only-a-password@a:1",
            {"username": None, "password": "only-a-password"},
            id="password-alone",
        ),
        pytest.param(
            "redis+sentinel://s1:26379,s2,s3:26380/mymaster",
            {
                "kind": "sentinel",
                "service": "mymaster",
                "db": 0,
                "nodes": (("s1", 26379), ("s2", 26379), ("s3", 26380)),
            },
            id="sentinel",
        ),
        pytest.param(
            "redis+sentinel://:pw@s1/my%20master/3/",
            {"service": "my master", "db": 3, "password": "pw", "username": None},
            id="sentinel-db-escaped-service",
        ),
        pytest.param(
            "rediss+sentinel://s1/m?sentinel_password=spw&ssl_cert_reqs=none",
            {"tls": True, "options": {"sentinel_password": "spw", "ssl_cert_reqs": "none"}},
            id="sentinel-tls-sentinel-auth",
        ),
        pytest.param("REDIS+CLUSTER://a:1", {"kind": "cluster"}, id="scheme-case"),
    ],
)
def test_good_urls(url: str, expected: dict[str, object]) -> None:
    target = parse_redis_url(url)
    assert target.url == url
    for name, value in expected.items():
        assert getattr(target, name) == value, name


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("http://redis", "must be a", id="http"),
        pytest.param("redis+cluster", "must be a", id="no-authority"),
        pytest.param("redis+shard://a:1", "must be a", id="unknown-topology"),
        pytest.param("redis+cluster://", "empty host", id="cluster-no-host"),
        pytest.param("redis+cluster://a:1,,b:2", "empty host", id="cluster-empty-host"),
        pytest.param("redis+cluster://a:0", "port", id="port-zero"),
        pytest.param("redis+cluster://a:70000", "port", id="port-too-high"),
        pytest.param("redis+cluster://a:x", "port", id="port-not-a-number"),
        pytest.param("redis+cluster://::1:7000", "IPv6", id="ipv6-without-brackets"),
        pytest.param("redis+cluster://[::1", "IPv6", id="ipv6-unclosed"),
        pytest.param("redis+cluster://a:1/1", "database 0", id="cluster-db-1"),
        pytest.param("redis+cluster://a:1?foo=1", "unknown option 'foo'", id="unknown-option"),
        pytest.param(
            "redis+cluster://a:1?ssl_ca_certs=/ca", "rediss+", id="tls-option-without-tls"
        ),
        pytest.param(
            "redis+cluster://a:1?sentinel_password=x", "unknown option", id="sentinel-on-cluster"
        ),
        pytest.param("rediss+cluster://a:1?ssl_cert_reqs=maybe", "ssl_cert_reqs", id="cert-reqs"),
        pytest.param("rediss+cluster://a:1?ssl_ca_certs=", "needs a value", id="empty-option"),
        pytest.param(
            "rediss+cluster://a?ssl_ca_certs=a&ssl_ca_certs=b", "twice", id="option-twice"
        ),
        pytest.param("redis+cluster://a:1?novalue", "malformed", id="malformed-query"),
        pytest.param("redis+cluster://a:1#frag", "fragment", id="fragment"),
        pytest.param("redis+sentinel://s1:26379", "service", id="sentinel-no-service"),
        pytest.param("redis+sentinel://s1:26379/", "service", id="sentinel-empty-service"),
        pytest.param("redis+sentinel://s1/m/x", "number", id="sentinel-db-not-a-number"),
        pytest.param("redis+sentinel://s1/m/1/2", "/SERVICE", id="sentinel-path-too-long"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_redis_url(url)


def test_errors_and_repr_never_show_the_password() -> None:
    url = "redis+cluster://app:hunter2-pw@a:1?foo=1"
    with pytest.raises(ValueError, match="unknown option") as info:
        parse_redis_url(url)
    assert "hunter2-pw" not in str(info.value)
    target = parse_redis_url("rediss+sentinel://u:hunter2-pw@s/m?sentinel_password=hunter3-pw")
    assert "hunter2-pw" not in repr(target)
    assert "hunter3-pw" not in repr(target)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        "redis+sentinel://127.0.0.1:26379/strata",
    ],
)
def test_settings_accept_every_form(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+cluster://a:1/3", "database 0"),
        ("redis+sentinel://s1", "service"),
        ("tcp://redis:6379", "must be a"),
    ],
)
def test_settings_refuse_a_bad_url_naming_the_field(url: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(redis_url=url)
    assert "redis_url" in str(info.value)
    assert reason in str(info.value)


def test_a_target_is_frozen() -> None:
    target = parse_redis_url("redis+cluster://a:1")
    assert isinstance(target, RedisTarget)
    with pytest.raises(AttributeError):
        target.kind = "single"  # type: ignore[misc]
