"""Which keys the configuration has: regmirror's (each with its parser and default) and
those of the distribution registry's format that are accepted but not implemented."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from regmirror.config.model import Reserve
from regmirror.config.parsers import (
    boolean,
    choice,
    count,
    credential_helper,
    fraction,
    key_prefix,
    mapping_list,
    metrics_path,
    parse_duration,
    parse_size,
    positive,
    redis_url,
    registry_name,
    string,
    strings,
    tls_version,
    url,
)
from regmirror.config.prefetch import concurrency, policy_list, reserve

UPSTREAM_KEYS: dict[str, Callable[[object], Any]] = {
    "name": registry_name,
    "url": url,
    "aliases": lambda v: tuple(registry_name(a) for a in strings(v)),
    "username": string,
    "password": string,
    "password_env": string,
    "password_file": string,
    "tag_freshness": parse_duration,
    "default": boolean,
    "docker_config": string,
    "credential_helper": credential_helper,
}


def upstream_list(value: object) -> tuple[dict[str, Any], ...]:
    """``regmirror.upstreams``: a list of mappings, checked key by key."""
    entries = mapping_list(value, UPSTREAM_KEYS, what="upstreams", needs="name and url")
    for i, entry in enumerate(entries):
        if "name" not in entry:
            raise ValueError(f"[{i}]: an upstream needs a name")
    return entries


# The keys regmirror implements: dotted path -> (parser, default). These defaults are
# the embedded default configuration; etc/config.yml spells them out (a test checks).
SCHEMA: dict[str, tuple[Callable[[object], Any], Any]] = {
    "version": (string, "0.1"),
    "log.level": (choice("debug", "info", "warn", "error"), "info"),
    "http.addr": (string, ":5000"),
    "http.net": (choice("tcp", "unix"), "tcp"),
    "storage.filesystem.rootdirectory": (string, "./data"),
    "proxy.remoteurl": (url, "https://registry-1.docker.io"),
    "proxy.username": (string, ""),
    "proxy.password": (string, ""),
    "proxy.ttl": (parse_duration, 168 * 3600.0),
    "http.tls.certificate": (string, ""),
    "http.tls.key": (string, ""),
    "http.tls.clientcas": (strings, ()),
    "http.tls.minimumtls": (tls_version, "tls1.2"),
    "auth.htpasswd.path": (string, ""),
    "auth.htpasswd.realm": (string, "regmirror"),
    "auth.anonymous": (choice("none", "read"), "none"),
    # regmirror's own extensions
    "regmirror.tag_freshness": (parse_duration, 30.0),
    "regmirror.access_log": (boolean, True),
    "regmirror.fast_path": (boolean, True),
    "regmirror.fsync": (boolean, True),
    "regmirror.access.allow": (strings, ()),
    "regmirror.access.deny": (strings, ()),
    "regmirror.idle_timeout": (parse_duration, 60.0),
    "regmirror.header_timeout": (parse_duration, 30.0),
    "regmirror.max_header_size": (parse_size, 16 * 1024),
    "regmirror.max_headers": (count, 100),
    "regmirror.max_url_length": (parse_size, 8 * 1024),
    "regmirror.manifest_cache_size": (parse_size, 64 * 1024 * 1024),
    "regmirror.max_manifest_size": (parse_size, 4 * 1024 * 1024),
    "regmirror.upstream_ca": (string, ""),
    "regmirror.upstream_connect_timeout": (parse_duration, 10.0),
    "regmirror.upstream_read_timeout": (parse_duration, 60.0),
    "regmirror.upstream_header_timeout": (parse_duration, 15.0),
    "regmirror.upstream_name": (string, ""),
    "regmirror.upstreams": (upstream_list, ()),
    "regmirror.upstream_failures": (count, 5),
    "regmirror.max_upstream_fetches": (count, 64),
    "regmirror.upstream_cooldown": (parse_duration, 30.0),
    "regmirror.metrics_path": (metrics_path, "/metrics"),
    "regmirror.status_page": (choice("auth", "open", "off"), "auth"),
    "regmirror.reaper_interval": (parse_duration, 60.0),
    "regmirror.max_size": (parse_size, 0),
    "regmirror.high_watermark": (fraction, 0.95),
    "regmirror.low_watermark": (fraction, 0.85),
    "regmirror.prefetch": (policy_list, ()),
    "regmirror.prefetch_reserve": (reserve, Reserve(20.0)),
    "regmirror.prefetch_concurrency": (concurrency, 3),
    "regmirror.cluster.redis": (redis_url, ""),
    "regmirror.cluster.name": (key_prefix, "regmirror"),
    "regmirror.cluster.replica": (string, ""),
    "regmirror.cluster.lease": (parse_duration, 15.0),
    "regmirror.workers": (positive, 1),
}

# Sections and keys of the distribution registry's format that regmirror accepts but
# does not implement: a mapping under any of these paths is accepted with a warning.
DISTRIBUTION_KEYS = frozenset(
    {
        "log.accesslog", "log.fields", "log.formatter", "log.hooks", "loglevel",
        "storage.filesystem.maxthreads", "storage.delete", "storage.cache",
        "storage.maintenance", "storage.redirect", "storage.tag", "storage.inmemory",
        "storage.s3", "storage.azure", "storage.gcs", "storage.swift", "storage.oss",
        "auth.token", "auth.silly", "auth.none",
        "middleware", "reporting", "notifications", "redis", "health",
        "compatibility", "validation", "policy", "catalog",
        "http.prefix", "http.host", "http.secret", "http.relativeurls", "http.draintimeout",
        "http.tls.letsencrypt", "http.tls.ciphersuites",
        "http.debug", "http.headers", "http.http2", "http.h2c",
    }
)  # fmt: skip
