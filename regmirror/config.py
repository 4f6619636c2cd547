"""Configuration: a drop-in for the distribution registry's config.yml, plus ``regmirror:``.

Pure code: ``parse_config`` turns a mapping into a frozen ``Config`` or raises
``ConfigError`` with one line naming the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from regmirror.domain.names import DOCKER_HUB_HOSTS


class ConfigError(Exception):
    pass


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d|w)")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_duration(value: object) -> float:
    """``30s``, ``15m``, ``168h``, ``7d``, ``1h30m`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 15m, 168h or 7d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration like 30s, 15m, 168h or 7d")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(f"expected a duration like 30s, 15m, 168h or 7d, got {value!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not text:
        raise ValueError("expected a duration like 30s, 15m, 168h or 7d, got ''")
    return total


def parse_size(value: object) -> int:
    """``50GiB``, ``500MB``, ``1T`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 512MiB or 50GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size like 512MiB or 50GiB")
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"expected a size like 512MiB or 50GiB, got {value!r}")
    number, unit = match.group(1), (match.group(2) or "").lower()
    prefix = unit[:1] if unit[:1] in "kmgtp" and unit else ""
    if "i" in unit:
        multiplier = 1024 ** ("kmgtp".index(prefix) + 1)
    else:
        multiplier = _SIZE_UNITS[prefix]
    return int(float(number) * multiplier)


def _str(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"expected a string, got {type(value).__name__}")


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {value!r}")


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"expected a non-negative integer, got {value!r}")


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        text = _str(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return check


def _fraction(value: object) -> float:
    """A share of the quota: 0.9 or 90%."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"expected a fraction like 0.9 or 90%, got {value!r}") from None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise ValueError(f"expected a fraction like 0.9 or 90%, got {value!r}")


def _strings(value: object) -> tuple[str, ...]:
    """A list of strings (a single string is a list of one)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def _tls_version(value: object) -> str:
    """distribution's ``minimumtls``; anything below TLS 1.2 is raised to it."""
    text = _str(value).lower()
    if text in ("tls1.0", "tls1.1", "tls1.2"):
        return "tls1.2"
    if text == "tls1.3":
        return text
    raise ValueError(f"expected tls1.2 or tls1.3, got {value!r}")


_UPSTREAM_KEYS: dict[str, Callable[[object], Any]] = {
    "name": lambda v: _name(v),
    "url": lambda v: _url(v),
    "aliases": lambda v: tuple(_name(a) for a in _strings(v)),
    "username": _str,
    "password": _str,
    "password_env": _str,
    "password_file": _str,
    "tag_freshness": parse_duration,
    "default": _bool,
    "docker_config": _str,
    "credential_helper": lambda v: _helper(v),
}


def _name(value: object) -> str:
    text = _str(value)
    if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?", text):
        raise ValueError(f"expected a registry name like ghcr.io or quay, got {value!r}")
    return text


def _helper(value: object) -> tuple[str, float]:
    if not isinstance(value, Mapping) or "command" not in value:
        raise ValueError("expected {command: ..., lifetime: ...}")
    unknown = set(value) - {"command", "lifetime"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
    return _str(value["command"]), parse_duration(value.get("lifetime", "5m"))


def _upstream_list(value: object) -> tuple[dict[str, Any], ...]:
    """``regmirror.upstreams``: a list of mappings, checked key by key."""
    if not isinstance(value, list):
        raise ValueError("expected a list of upstreams")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ValueError(f"[{i}]: expected a mapping with name and url")
        entry: dict[str, Any] = {}
        for key, raw in item.items():
            parser = _UPSTREAM_KEYS.get(key)
            if parser is None:
                raise ValueError(f"[{i}].{key}: unknown key")
            try:
                entry[key] = parser(raw)
            except ValueError as e:
                raise ValueError(f"[{i}].{key}: {e}") from None
        if "name" not in entry:
            raise ValueError(f"[{i}]: an upstream needs a name")
        out.append(entry)
    return tuple(out)


def _metrics_path(value: object) -> str:
    text = _str(value)
    if (text and not re.fullmatch(r"/[A-Za-z0-9_.-]+", text)) or text == "/v2":
        raise ValueError(f"expected one path segment like /metrics (or empty), got {value!r}")
    return text


def _url(value: object) -> str:
    text = _str(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return text


# The keys regmirror implements: dotted path -> (parser, default). These defaults are
# the embedded default configuration; etc/config.yml spells them out (a test checks).
SCHEMA: dict[str, tuple[Callable[[object], Any], Any]] = {
    "version": (_str, "0.1"),
    "log.level": (_choice("debug", "info", "warn", "error"), "info"),
    "http.addr": (_str, ":5000"),
    "http.net": (_choice("tcp", "unix"), "tcp"),
    "storage.filesystem.rootdirectory": (_str, "./data"),
    "proxy.remoteurl": (_url, "https://registry-1.docker.io"),
    "proxy.username": (_str, ""),
    "proxy.password": (_str, ""),
    "proxy.ttl": (parse_duration, 168 * 3600.0),
    "http.tls.certificate": (_str, ""),
    "http.tls.key": (_str, ""),
    "http.tls.clientcas": (_strings, ()),
    "http.tls.minimumtls": (_tls_version, "tls1.2"),
    "auth.htpasswd.path": (_str, ""),
    "auth.htpasswd.realm": (_str, "regmirror"),
    "auth.anonymous": (_choice("none", "read"), "none"),
    # regmirror's own extensions
    "regmirror.tag_freshness": (parse_duration, 30.0),
    "regmirror.access_log": (_bool, True),
    "regmirror.fsync": (_bool, True),
    "regmirror.access.allow": (_strings, ()),
    "regmirror.access.deny": (_strings, ()),
    "regmirror.idle_timeout": (parse_duration, 60.0),
    "regmirror.header_timeout": (parse_duration, 30.0),
    "regmirror.max_header_size": (parse_size, 16 * 1024),
    "regmirror.max_headers": (_int, 100),
    "regmirror.max_url_length": (parse_size, 8 * 1024),
    "regmirror.manifest_cache_size": (parse_size, 64 * 1024 * 1024),
    "regmirror.max_manifest_size": (parse_size, 4 * 1024 * 1024),
    "regmirror.upstream_ca": (_str, ""),
    "regmirror.upstream_connect_timeout": (parse_duration, 10.0),
    "regmirror.upstream_read_timeout": (parse_duration, 60.0),
    "regmirror.upstream_header_timeout": (parse_duration, 15.0),
    "regmirror.upstream_name": (_str, ""),
    "regmirror.upstreams": (lambda v: _upstream_list(v), ()),
    "regmirror.upstream_failures": (_int, 5),
    "regmirror.max_upstream_fetches": (_int, 64),
    "regmirror.upstream_cooldown": (parse_duration, 30.0),
    "regmirror.metrics_path": (lambda v: _metrics_path(v), "/metrics"),
    "regmirror.reaper_interval": (parse_duration, 60.0),
    "regmirror.max_size": (parse_size, 0),
    "regmirror.high_watermark": (_fraction, 0.95),
    "regmirror.low_watermark": (_fraction, 0.85),
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
class Limits:
    """What one client may ask of the listener."""

    idle_timeout: float = 60.0
    header_timeout: float = 30.0
    max_header_size: int = 16 * 1024
    max_headers: int = 100
    max_url_length: int = 8 * 1024


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
    reaper_interval: float = 60.0
    max_size: int = 0
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    ignored: tuple[str, ...] = ()

    @property
    def upstream(self) -> UpstreamConfig:
        """The default upstream."""
        return self.upstreams[0]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str):
            out[path] = value
        elif path in DISTRIBUTION_KEYS:
            out[path] = value
        elif isinstance(value, Mapping) and path not in SCHEMA:
            if not value:
                out[path] = value
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def listen_endpoint(addr: str, net: str = "tcp") -> str:
    """Turn distribution's ``http.addr`` into a Twisted server endpoint description."""
    if net == "unix":
        return "unix:" + addr.replace(":", r"\:")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port or :port, got {addr!r}")
    host = host.strip("[]")
    if not host:
        return f"tcp:{port}"
    if ":" in host:
        return f"tcp6:{port}:interface={host.replace(':', chr(92) + ':')}"
    return f"tcp:{port}:interface={host}"


def parse_config(data: object, source: str = "<default>") -> tuple[Config, list[str]]:
    """Validate a loaded YAML document; return the config and warnings to log."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping")
    values = {path: default for path, (_, default) in SCHEMA.items()}
    flat = _flatten(data)
    values["_proxy_given"] = "proxy.remoteurl" in flat
    ignored: list[str] = []
    for path, raw in flat.items():
        if path in SCHEMA:
            parser = SCHEMA[path][0]
            if raw is None:
                continue
            try:
                values[path] = parser(raw)
            except ValueError as e:
                sep = "" if str(e).startswith("[") else " "
                raise ConfigError(f"{source}: {path}:{sep}{e}") from None
        elif path in DISTRIBUTION_KEYS or any(
            path.startswith(key + ".") for key in DISTRIBUTION_KEYS
        ):
            top = next(k for k in DISTRIBUTION_KEYS if path == k or path.startswith(k + "."))
            if top not in ignored:
                ignored.append(top)
        else:
            raise ConfigError(f"{source}: {path}: unknown configuration key")
    if values["regmirror.low_watermark"] >= values["regmirror.high_watermark"]:
        raise ConfigError(
            f"{source}: regmirror.low_watermark: must be below regmirror.high_watermark"
        )
    try:
        listen = listen_endpoint(values["http.addr"], values["http.net"])
    except ValueError as e:
        raise ConfigError(f"{source}: http.addr: {e}") from None
    url = values["proxy.remoteurl"]
    host = urlsplit(url).netloc
    docker_hub = (urlsplit(url).hostname or "") in DOCKER_HUB_HOSTS
    name = values["regmirror.upstream_name"] or ("docker.io" if docker_hub else host)
    upstreams = _build_upstreams(values, source, name, url, docker_hub)
    warnings = []
    if ignored:
        warnings.append(
            f"{source}: accepted but not implemented by regmirror: {', '.join(sorted(ignored))}"
        )
    if any(k.startswith("auth.") for k in ignored) and not values["auth.htpasswd.path"]:
        warnings.append(
            f"{source}: auth: only auth.htpasswd is implemented; "
            "clients are NOT authenticated by this configuration"
        )
    config = Config(
        source=source,
        listen=listen,
        root=Path(values["storage.filesystem.rootdirectory"]),
        upstreams=upstreams,
        ttl=values["proxy.ttl"],
        tag_freshness=values["regmirror.tag_freshness"],
        log_level=values["log.level"],
        tls=_tls(values, source),
        auth=_auth(values, source),
        access=AccessConfig(
            allow=values["regmirror.access.allow"], deny=values["regmirror.access.deny"]
        ),
        limits=Limits(
            idle_timeout=values["regmirror.idle_timeout"],
            header_timeout=values["regmirror.header_timeout"],
            max_header_size=values["regmirror.max_header_size"],
            max_headers=values["regmirror.max_headers"],
            max_url_length=values["regmirror.max_url_length"],
        ),
        access_log=values["regmirror.access_log"],
        fsync=values["regmirror.fsync"],
        manifest_cache_size=values["regmirror.manifest_cache_size"],
        max_manifest_size=values["regmirror.max_manifest_size"],
        upstream_ca=values["regmirror.upstream_ca"],
        connect_timeout=values["regmirror.upstream_connect_timeout"],
        read_timeout=values["regmirror.upstream_read_timeout"],
        upstream_header_timeout=values["regmirror.upstream_header_timeout"],
        single_upstream=len(upstreams) == 1 and not values["regmirror.upstreams"],
        breaker_failures=values["regmirror.upstream_failures"],
        max_upstream_fetches=values["regmirror.max_upstream_fetches"],
        metrics_path=values["regmirror.metrics_path"],
        breaker_cooldown=values["regmirror.upstream_cooldown"],
        reaper_interval=values["regmirror.reaper_interval"],
        max_size=values["regmirror.max_size"],
        high_watermark=values["regmirror.high_watermark"],
        low_watermark=values["regmirror.low_watermark"],
        ignored=tuple(sorted(ignored)),
    )
    return config, warnings


def _build_upstreams(
    values: Mapping[str, Any], source: str, name: str, url: str, docker_hub: bool
) -> tuple[UpstreamConfig, ...]:
    """Every upstream, the default first: ``proxy.remoteurl`` unless an entry of
    ``regmirror.upstreams`` says ``default: true``; an entry named like the
    ``proxy`` upstream configures that one."""
    entries = list(values["regmirror.upstreams"])
    key = "regmirror.upstreams"
    base = {
        "name": name,
        "url": url,
        "username": values["proxy.username"],
        "password": values["proxy.password"],
    }
    merged = False
    for entry in entries:
        if entry["name"] == name:
            entry.update({k: v for k, v in base.items() if k not in entry or not entry[k]})
            merged = True
    if not merged:
        entries.insert(0, {**base, "implicit": True})
    defaults = [e for e in entries if e.get("default")]
    if len(defaults) > 1:
        raise ConfigError(f"{source}: {key}: only one upstream can be the default")
    if defaults:
        entries.remove(defaults[0])
        entries.insert(0, defaults[0])
        if entries[1:] and entries[1].get("implicit") and not values.get("_proxy_given"):
            entries.pop(1)  # proxy.remoteurl was only the built-in default
    seen: set[str] = set()
    out = []
    for entry in entries:
        if "url" not in entry:
            raise ConfigError(f"{source}: {key}: upstream {entry['name']} needs a url")
        for label in (entry["name"], *entry.get("aliases", ())):
            if label in seen:
                raise ConfigError(f"{source}: {key}: the name {label} is used twice")
            seen.add(label)
        hub = (urlsplit(entry["url"]).hostname or "") in DOCKER_HUB_HOSTS
        command, lifetime = entry.get("credential_helper", ("", 300.0))
        out.append(
            UpstreamConfig(
                name=entry["name"],
                url=entry["url"],
                username=entry.get("username", ""),
                password=entry.get("password", ""),
                docker_hub=hub,
                aliases=entry.get("aliases", ()),
                tag_freshness=entry.get("tag_freshness"),
                password_env=entry.get("password_env", ""),
                password_file=entry.get("password_file", ""),
                helper_command=command,
                helper_lifetime=lifetime,
                docker_config=entry.get("docker_config", ""),
            )
        )
    return tuple(out)


def _tls(values: Mapping[str, Any], source: str) -> TLSConfig | None:
    certificate, key = values["http.tls.certificate"], values["http.tls.key"]
    if not certificate and not key:
        if values["http.tls.clientcas"]:
            raise ConfigError(f"{source}: http.tls.clientcas: needs http.tls.certificate and key")
        return None
    if not certificate or not key:
        missing = "http.tls.key" if certificate else "http.tls.certificate"
        raise ConfigError(f"{source}: {missing}: TLS needs both a certificate and a key")
    return TLSConfig(
        certificate=certificate,
        key=key,
        clientcas=values["http.tls.clientcas"],
        minimum=values["http.tls.minimumtls"],
    )


def _auth(values: Mapping[str, Any], source: str) -> AuthConfig | None:
    path = values["auth.htpasswd.path"]
    if not path:
        if values["auth.anonymous"] != "none":
            raise ConfigError(f"{source}: auth.anonymous: needs auth.htpasswd.path")
        return None
    return AuthConfig(
        htpasswd=path,
        realm=values["auth.htpasswd.realm"],
        anonymous_read=values["auth.anonymous"] == "read",
    )


def load_config(path: str | None) -> tuple[Config, list[str]]:
    """Read and validate a config file; ``None`` gives the embedded default."""
    if path is None:
        return parse_config({})
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return parse_config(data, path)
