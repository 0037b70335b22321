"""Where Redis is, as one URL: a single server, a Redis Cluster, or a Sentinel-watched master.

Forms (`rediss` for TLS everywhere a `redis` scheme is shown):
- `redis://…`, `rediss://…`, `unix://…` — one server, exactly as redis-py reads it;
- `redis+cluster://[user:pass@]host:port[,host:port…][/][?options]` — any nodes of a cluster,
  from which the client discovers the rest (port 6379 when omitted; database 0 only);
- `redis+sentinel://[user:pass@]host:port[,host:port…]/SERVICE[/db][?options]` — the sentinels
  (port 26379 when omitted) and the name of the master they watch; the credentials are the
  master's, `sentinel_username` / `sentinel_password` the sentinels' own when they need any.

Guarantees: `parse_redis_url` is pure (no I/O, no redis import, so `config` stays a leaf) and is
the only place a Redis URL is taken apart; settings validation and the client factory
(`caches.redis_client`) both call it, so a URL that starts the gateway is one the client can
use. A bad URL raises `ValueError` saying what is wrong, never echoing the URL (it may carry a
password); percent-escapes in credentials and service names are decoded. `RedisTarget` keeps
secrets out of its `repr`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote

Kind = Literal["single", "cluster", "sentinel"]

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
# scheme: (kind, TLS)
TOPOLOGY_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
DEFAULT_PORTS: dict[Kind, int] = {"single": 6379, "cluster": 6379, "sentinel": 26379}

TLS_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"})
SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
CERT_REQS = frozenset({"none", "optional", "required"})

SCHEMES_HELP = (
    "redis://, rediss://, unix://, redis+cluster://, rediss+cluster://, redis+sentinel:// "
    "or rediss+sentinel://"
)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed Redis URL. For `single`, only `url` matters (redis-py parses it)."""

    kind: Kind
    url: str = field(repr=False)
    nodes: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    service: str | None = None
    db: int = 0
    options: Mapping[str, str] = field(default_factory=dict, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """`url` taken apart (see the module), or `ValueError` saying what is wrong with it."""
    if url.startswith(SINGLE_SCHEMES):
        return RedisTarget("single", url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in TOPOLOGY_SCHEMES:
        raise ValueError(f"must be a {SCHEMES_HELP} URL")
    kind, tls = TOPOLOGY_SCHEMES[scheme.lower()]
    if "#" in rest:
        raise ValueError("must not have a #fragment")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostlist = authority.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    nodes = tuple(_node(part, DEFAULT_PORTS[kind]) for part in hostlist.split(","))
    service, db = _path(kind, path if slash else None)
    options = _options(query, tls=tls, sentinel=kind == "sentinel")
    return RedisTarget(kind, url, nodes, tls, username, password, service, db, options)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, secret = userinfo.partition(":")
    if not colon:
        # `redis://secret@host` is redis-py's spelling of a password alone.
        return None, unquote(user) or None
    return unquote(user) or None, unquote(secret) or None


def _node(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port` or `[v6 address]:port`."""
    if not text:
        raise ValueError("has an empty host in its host list")
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or not host or (tail and not tail.startswith(":")):
            raise ValueError("has a malformed [IPv6] host")
        port_text = tail[1:] if tail else ""
    else:
        host, _, port_text = text.partition(":")
        if not host or ":" in port_text:
            raise ValueError("has a malformed host (write IPv6 addresses in [brackets])")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return host, int(port_text)


def _path(kind: Kind, path: str | None) -> tuple[str | None, int]:
    if kind == "cluster":
        if path not in (None, "", "0"):
            raise ValueError("a Redis Cluster has database 0 only: no path but / or /0")
        return None, 0
    parts = [] if path is None else path.removesuffix("/").split("/")
    if not parts or not parts[0]:
        raise ValueError("a Sentinel URL names the master's service: …/SERVICE[/db]")
    if len(parts) > 2:
        raise ValueError("a Sentinel URL's path is /SERVICE or /SERVICE/db")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError("the database after the service name must be a number")
        db = int(parts[1])
    return unquote(parts[0]), db


def _options(query: str, *, tls: bool, sentinel: bool) -> dict[str, str]:
    allowed = frozenset[str]()
    if tls:
        allowed |= TLS_OPTIONS
    if sentinel:
        allowed |= SENTINEL_OPTIONS
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("has a malformed ?query") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            hint = f"; known here: {sorted(allowed)}" if allowed else ""
            tls_hint = " (TLS options need a rediss+ scheme)" if name in TLS_OPTIONS else ""
            raise ValueError(f"unknown option {name!r}{tls_hint}{hint}")
        if name in options:
            raise ValueError(f"option {name!r} given twice")
        if not value:
            raise ValueError(f"option {name!r} needs a value")
        options[name] = value
    reqs = options.get("ssl_cert_reqs")
    if reqs is not None and reqs not in CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {sorted(CERT_REQS)}")
    return options
