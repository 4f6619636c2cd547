"""``twistd regmirror``: options and the service tree."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service, strports
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage

from regmirror import logs
from regmirror.cache import Cache
from regmirror.config import Config, ConfigError, load_config
from regmirror.fetch import threaded_writers
from regmirror.reaper import Reaper
from regmirror.store import Store
from regmirror.upstream import Upstream
from regmirror.web import make_site

log = logs.get_logger()


class Options(usage.Options):
    synopsis = "[-c CONFIG]"
    longdesc = (
        "Run regmirror, a pull-through cache for container registries. The configuration "
        "file is the distribution registry's config.yml format plus a 'regmirror:' "
        "section (see etc/config.yml); without -c the embedded defaults are used: "
        "upstream https://registry-1.docker.io, storage ./data, port 5000."
    )
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self.loaded = load_config(self["config"])
        except ConfigError as e:
            sys.stderr.write(f"regmirror: {e}\n")
            raise SystemExit(2) from None


def _trust_root(path: str) -> Any:
    if not path:
        return None
    with open(path, "rb") as f:
        pem = f.read()
    blocks = [
        b"-----BEGIN CERTIFICATE-----" + block
        for block in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])


def build(config: Config, reactor: Any) -> tuple[service.MultiService, Cache]:
    """The service tree for a configuration (the reactor injected)."""
    logs.set_level(config.log_level)
    store = Store(config.root)
    swept = store.prepare()
    if swept:
        log.info("swept {count} temporary files left by a previous run", count=swept)
    upstream = Upstream(
        reactor,
        config.upstream,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        trust_root=_trust_root(config.upstream_ca),
    )
    reaper = Reaper(
        reactor,
        store,
        ttl=config.ttl,
        interval=config.reaper_interval,
        max_size=config.max_size,
        high=config.high_watermark,
        low=config.low_watermark,
        run_in_thread=lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a),
    )
    cache = Cache(
        reactor,
        store,
        upstream,
        tag_freshness=config.tag_freshness,
        fsync=config.fsync,
        manifest_cache_size=config.manifest_cache_size,
        max_manifest_size=config.max_manifest_size,
        read_timeout=config.read_timeout,
        writer=threaded_writers(reactor),
        reaper=reaper,
    )
    reaper.in_use = cache.in_use
    reaper.forget = cache.forget
    site = make_site(cache, access_log=config.access_log)
    top = service.MultiService()
    reaper.setServiceParent(top)
    listener = strports.service(config.listen, site)
    listener.setServiceParent(top)
    return top, cache


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config, warnings = options.loaded
    for warning in warnings:
        log.warn("{warning}", warning=warning)
    top, _ = build(config, reactor)
    log.info(
        "regmirror mirroring {upstream} ({url}) into {root}, listening on {listen}",
        upstream=config.upstream.name,
        url=config.upstream.url,
        root=str(config.root.absolute()),
        listen=config.listen,
    )
    return top
