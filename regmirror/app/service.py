"""``twistd regmirror``: options and the service tree."""

from __future__ import annotations

import functools
import sys
from typing import Any

from twisted.application import service
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage

from regmirror import logs
from regmirror.api.health import Readiness
from regmirror.api.metrics import metrics_resource
from regmirror.api.prefetch_metrics import PrefetchCollector
from regmirror.api.status import OperatorPages, Status
from regmirror.app.admin import add_admin_listener
from regmirror.app.cluster import add_cluster, cluster_parts, replica_name
from regmirror.app.listeners import add_listener, check_files
from regmirror.app.processes import check_workers, joined, workers_service
from regmirror.app.sockets import Inherited
from regmirror.config import Config, ConfigError, load_config
from regmirror.domain.events import RecentErrors
from regmirror.expiry.clusterreaper import ClusterReaper
from regmirror.expiry.ledger import Ledger
from regmirror.expiry.purge import Purger
from regmirror.expiry.reaper import Reaper
from regmirror.expiry.usage import Usage
from regmirror.fetch.heap import tune_heap
from regmirror.fetch.inflight import InFlight, LocalInFlight
from regmirror.fetch.writers import threaded_writers
from regmirror.http.internals import read_more_at_once
from regmirror.http.tls import ServerTLS, upstream_trust_root
from regmirror.mirror.cache import Cache
from regmirror.mirror.freshness import LocalTagFreshness, TagFreshness
from regmirror.mirror.manifests import ManifestLRU
from regmirror.mirror.mirrors import Mirrors
from regmirror.mirror.observe import Sampler
from regmirror.mirror.prefetch import PrefetchService
from regmirror.storage.store import Store
from regmirror.upstream.client import Upstream
from regmirror.upstream.credentials import Credentials
from regmirror.upstream.remote import RemoteRegistry

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
            self.tls = check_files(self.loaded[0])
            check_workers(self.loaded[0])
        except ConfigError as e:
            sys.stderr.write(f"regmirror: {e}\n")
            raise SystemExit(2) from None


def build(
    config: Config,
    reactor: Any,
    tls: ServerTLS | None = None,
    *,
    inherited: Inherited | None = None,
    worker: int | None = None,
) -> service.MultiService:
    """The service tree of a mirror for a configuration (the reactor injected); a
    worker of ``regmirror.workers`` says which one it is and serves on the socket it
    ``inherited``."""
    tune_heap()  # glibc's thresholds for blob-sized buffers (regmirror.fetch.heap)
    logs.set_level(config.log_level)
    cluster = config.cluster
    replica = replica_name(config, worker) if cluster is not None else ""
    store = Store(config.root, replica)
    swept = store.prepare()
    if swept:
        log.info("swept {count} temporary files left by a previous run", count=swept)
    run_in_thread = lambda f, *a: deferToThreadPool(  # noqa: E731
        reactor, reactor.getThreadPool(), f, *a
    )
    ledger = Ledger(
        reactor,
        ttl=config.ttl,
        max_size=config.max_size,
        high=config.high_watermark,
        low=config.low_watermark,
    )
    # What every upstream's cache shares: blobs and manifests are content-addressed.
    inflight: InFlight = LocalInFlight(config.max_upstream_fetches)
    lru = ManifestLRU(config.manifest_cache_size)
    freshness: TagFreshness = LocalTagFreshness(reactor)
    usage: Usage = ledger
    parts = None
    if cluster is not None:  # the same seams, on Redis (regmirror.app.cluster)
        parts = cluster_parts(config, cluster, reactor, store, replica)
        inflight, freshness, usage = parts.inflight, parts.freshness, parts.usage
    trust_root = upstream_trust_root(config.upstream_ca)
    errors = RecentErrors(reactor.seconds)  # for the status page
    caches = []
    for upstream_config in config.upstreams:
        upstream = Upstream(
            reactor,
            upstream_config,
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            header_timeout=config.upstream_header_timeout,
            trust_root=trust_root,
            credentials=Credentials(
                upstream_config, clock=reactor.seconds, run_in_thread=run_in_thread
            ),
            breaker_failures=config.breaker_failures,
            breaker_cooldown=config.breaker_cooldown,
            errors=errors,
        )
        remote = RemoteRegistry(
            upstream,
            reactor,
            read_timeout=config.read_timeout,
            max_body=config.max_manifest_size,
        )
        window = upstream_config.tag_freshness
        caches.append(
            Cache(
                reactor,
                store,
                remote,
                inflight=inflight,
                lru=lru,
                usage=usage,
                freshness=freshness,
                tag_freshness=config.tag_freshness if window is None else window,
                fsync=config.fsync,
                writer=threaded_writers(reactor),
                tune_transport=read_more_at_once,
                errors=errors,
            )
        )
    mirrors = Mirrors(caches, single=config.single_upstream)
    top = service.MultiService()
    reaper: Reaper | ClusterReaper
    if parts is None:
        reaper = Reaper(
            reactor,
            store,
            ledger,
            interval=config.reaper_interval,
            run_in_thread=run_in_thread,
            in_use=inflight.in_use,
            on_removed=mirrors.forget,
        )
        reaper.setServiceParent(top)
    else:
        reaper = add_cluster(
            top,
            parts,
            config,
            reactor,
            store,
            run_in_thread=run_in_thread,
            on_removed=mirrors.forget,
        )
    sampler = Sampler(reactor, mirrors)
    sampler.setServiceParent(top)
    readiness = Readiness(reactor, store, reaper)
    prefetch = PrefetchService(
        reactor,
        mirrors,
        # one worker runs the policies: what it warms is in the shared store for all
        config.prefetch if worker is None or worker == 1 else (),
        reserve=config.prefetch_reserve,
        concurrency=config.prefetch_concurrency,
    )
    prefetch.setName("prefetch")  # top.getServiceNamed("prefetch").status()
    prefetch.setServiceParent(top)
    status = Status(
        reactor, mirrors, reaper, sampler, errors, readiness, sections={"prefetch": prefetch.status}
    )
    pages = OperatorPages(status, readiness, mirrors, config.status_page)
    ready = None
    if inherited is not None and parts is not None:  # a worker: accept once joined
        ready = functools.partial(joined, parts.coordinator, reactor)
    site = add_listener(top, config, mirrors, reactor, tls, pages, inherited, ready)
    if parts is None:  # purge and fsck --repair use the local ledger: not in a cluster
        purger = Purger(
            store,
            run_in_thread=run_in_thread,
            in_use=inflight.in_use,
            drop=ledger.drop,
            on_removed=mirrors.forget,
            on_tag_removed=mirrors.forget_tag,
        )
        add_admin_listener(top, store, purger, reactor)
    if config.metrics_path:
        coordinator = parts.coordinator if parts is not None else None
        resource = metrics_resource(
            mirrors, reaper, site.responses, [PrefetchCollector(prefetch)], coordinator
        )
        site.resource.putChild(config.metrics_path[1:].encode(), resource)
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config, warnings = options.loaded
    for warning in warnings:
        log.warn("{warning}", warning=warning)
    if config.workers > 1:
        return workers_service(config, reactor, options["config"])
    top = build(config, reactor, options.tls)
    log.info(
        "regmirror mirroring {upstreams} into {root}, listening on {listen}",
        upstreams=", ".join(
            f"{u.name} ({u.url}){' [default]' if i == 0 else ''}"
            for i, u in enumerate(config.upstreams)
        ),
        root=str(config.root.absolute()),
        listen=config.listen,
    )
    return top
