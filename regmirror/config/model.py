"""The validated configuration: frozen attrs classes, built by ``regmirror.config.load``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import attrs

from regmirror.domain.names import DOCKER_HUB_HOSTS


@attrs.frozen
class UpstreamConfig:
    name: str
    url: str
    username: str
    password: str = attrs.field(repr=False)
    docker_hub: bool
    aliases: tuple[str, ...] = ()
    tag_freshness: float | None = None  # None: regmirror.tag_freshness
    password_env: str = ""
    password_file: str = ""
    helper_command: str = ""
    helper_lifetime: float = 300.0
    docker_config: str = ""


def routing_table(upstreams: Sequence[UpstreamConfig]) -> dict[str, int]:
    """What a request may call each upstream by (its index in ``upstreams``): its name
    and aliases, then, where no name took it, its URL's host (Docker Hub by every host
    of it). ``regmirror.mirror.mirrors`` routes requests by it, the CLI repositories."""
    table: dict[str, int] = {}
    for i, upstream in enumerate(upstreams):
        for label in (upstream.name, *upstream.aliases):
            table[label] = i
    for i, upstream in enumerate(upstreams):
        parts = urlsplit(upstream.url)
        hosts = [parts.netloc, parts.hostname or ""]
        if upstream.docker_hub:
            hosts.extend(sorted(DOCKER_HUB_HOSTS))
        for host in hosts:
            if host:
                table.setdefault(host, i)
    return table


@attrs.frozen
class TLSConfig:
    """``http.tls``: PEM files (the certificate file may hold the full chain)."""

    certificate: str
    key: str
    clientcas: tuple[str, ...] = ()
    minimum: str = "tls1.2"


@attrs.frozen
class AuthConfig:
    """``auth.htpasswd`` and ``auth.anonymous``."""

    htpasswd: str
    realm: str
    anonymous_read: bool = False


@attrs.frozen
class AccessConfig:
    """``regmirror.access``: repository patterns (fnmatch) allowed and denied."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@attrs.frozen
class Reserve:
    """What prefetching leaves of an upstream's rate limit for on-demand pulls: a count
    of requests, or a share of the limit (``percent``)."""

    value: float
    percent: bool = True

    def requests(self, limit: int | None) -> int | None:
        """The reserve in requests (None: a share of a limit the upstream never sent)."""
        if not self.percent:
            return int(self.value)
        return None if limit is None else int(-(-self.value * limit // 100))


@attrs.frozen
class PrefetchPolicy:
    """One entry of ``regmirror.prefetch``: which tags to keep warm, and how often."""

    name: str
    upstream: str  # the upstream's name
    repositories: tuple[str, ...]
    tags: tuple[str, ...] = ("latest",)
    exclude: tuple[str, ...] = ()
    interval: float = 900.0
    platforms: tuple[str, ...] = ()  # os/arch[/variant]; empty: every platform
    reserve: Reserve | None = None  # None: regmirror.prefetch_reserve


@attrs.frozen
class Limits:
    """What one client may ask of the listener."""

    idle_timeout: float = 60.0
    header_timeout: float = 30.0
    max_header_size: int = 16 * 1024
    max_headers: int = 100
    max_url_length: int = 8 * 1024


@attrs.frozen
class RedisAddress:
    """Where the cluster's Redis is (``regmirror.cluster.redis``, parsed)."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False


@attrs.frozen
class ClusterConfig:
    """``regmirror.cluster``: replicas over one shared store, coordinated by Redis."""

    redis: RedisAddress
    name: str = "regmirror"  # the prefix of every key and channel
    replica: str = ""  # this replica's name (empty: host name and port)
    lease: float = 15.0  # a fetch's lease in Redis, renewed while it runs


@attrs.frozen
class Config:
    source: str
    listen: str
    root: Path
    upstreams: tuple[UpstreamConfig, ...]  # the default first
    ttl: float
    tag_freshness: float
    log_level: str
    tls: TLSConfig | None
    auth: AuthConfig | None
    access: AccessConfig
    limits: Limits
    access_log: bool
    fsync: bool
    manifest_cache_size: int
    max_manifest_size: int
    upstream_ca: str
    connect_timeout: float
    read_timeout: float
    upstream_header_timeout: float = 15.0  # request sent -> response headers
    # Only proxy.remoteurl, no regmirror.upstreams: ?ns= is routed as registry:2 does
    single_upstream: bool = False
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    max_upstream_fetches: int = 64
    metrics_path: str = "/metrics"
    status_page: str = "auth"  # GET / and /status.json: auth | open | off
    reaper_interval: float = 60.0
    max_size: int = 0
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    prefetch: tuple[PrefetchPolicy, ...] = ()
    prefetch_reserve: Reserve = Reserve(20.0)
    prefetch_concurrency: int = 3
    cluster: ClusterConfig | None = None  # regmirror.cluster.redis set
    workers: int = 1  # processes sharing the listener (regmirror.app.workers)
    fast_path: bool = True  # cached manifests answered by the channel (http.fastpath)
    ignored: tuple[str, ...] = ()

    @property
    def upstream(self) -> UpstreamConfig:
        """The default upstream."""
        return self.upstreams[0]
