"""From a file, or a mapping, to a ``Config`` (pure code but for reading the file):
one ``ConfigError`` naming the file and the key for anything wrong."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from regmirror.config.model import (
    AccessConfig,
    AuthConfig,
    ClusterConfig,
    Config,
    Limits,
    TLSConfig,
    UpstreamConfig,
)
from regmirror.config.parsers import listen_endpoint, redis_address
from regmirror.config.prefetch import build_policies
from regmirror.config.schema import DISTRIBUTION_KEYS, SCHEMA
from regmirror.domain.names import DOCKER_HUB_HOSTS


class ConfigError(Exception):
    pass


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
    try:
        prefetch = build_policies(values["regmirror.prefetch"], upstreams)
    except ValueError as e:
        raise ConfigError(f"{source}: regmirror.prefetch:{e}") from None
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
        fast_path=values["regmirror.fast_path"],
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
        status_page=values["regmirror.status_page"],
        breaker_cooldown=values["regmirror.upstream_cooldown"],
        reaper_interval=values["regmirror.reaper_interval"],
        max_size=values["regmirror.max_size"],
        high_watermark=values["regmirror.high_watermark"],
        low_watermark=values["regmirror.low_watermark"],
        prefetch=prefetch,
        prefetch_reserve=values["regmirror.prefetch_reserve"],
        prefetch_concurrency=values["regmirror.prefetch_concurrency"],
        cluster=_cluster(values, source),
        workers=values["regmirror.workers"],
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


def _cluster(values: Mapping[str, Any], source: str) -> ClusterConfig | None:
    url = values["regmirror.cluster.redis"]
    lease = values["regmirror.cluster.lease"]
    if not 1.0 <= lease <= 300.0:
        raise ConfigError(f"{source}: regmirror.cluster.lease: expected 1s to 5m, got {lease:g}s")
    if not url:
        return None
    return ClusterConfig(
        redis=redis_address(url),
        name=values["regmirror.cluster.name"],
        replica=values["regmirror.cluster.replica"],
        lease=lease,
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
