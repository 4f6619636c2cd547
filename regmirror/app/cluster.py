"""The parts of a replica of a cluster (``regmirror.cluster.redis`` set), for ``build``.

Instead of the single-process parts (``LocalInFlight``, ``LocalTagFreshness``, the
``Ledger`` with its SQLite state and the ``Reaper``), a replica runs their Redis
counterparts over one ``Coordinator``: ``RedisInFlight`` (around its own
``LocalInFlight``), ``RedisTagFreshness``, ``ClusterUsage`` and ``ClusterReaper``. No
SQLite state is kept in a cluster: the ledger is Redis's, and what Redis lost (a restart)
is adopted again from a scan of the store by the next leading reaper.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application import service

from regmirror.config import Config
from regmirror.config.model import ClusterConfig
from regmirror.coord.redis import Coordinator
from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.expiry.clusterreaper import ClusterReaper, RunInThread
from regmirror.expiry.clusterusage import ClusterUsage
from regmirror.fetch.inflight import LocalInFlight
from regmirror.fetch.redisinflight import RedisInFlight
from regmirror.mirror.redisfreshness import RedisTagFreshness
from regmirror.storage.store import Store


def replica_name(config: Config, worker: int | None = None) -> str:
    """``regmirror.cluster.replica``, else ``<host>-<port>`` (``-w<n>`` for a worker):
    it names the replica's temporary directory and its leases."""
    cluster = config.cluster
    name = cluster.replica if cluster is not None else ""
    if not name:
        port = re.search(r"^tcp6?:(\d+)", config.listen)
        name = f"{socket.gethostname()}-{port.group(1) if port else 'unix'}"
    if worker is not None:
        name = f"{name}-w{worker}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


class _Started(service.Service):
    """Starts and stops a part that is not a service itself, with the tree."""

    def __init__(self, start: Callable[[], object], stop: Callable[[], object]) -> None:
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> Any:
        super().stopService()
        return self._stop()


@attrs.frozen
class ClusterParts:
    coordinator: Coordinator
    inflight: RedisInFlight
    freshness: RedisTagFreshness
    usage: ClusterUsage
    replica: str


def cluster_parts(
    config: Config, cluster: ClusterConfig, reactor: Any, store: Store, replica: str
) -> ClusterParts:
    coordinator = Coordinator(reactor, cluster.redis, cluster.name)
    inflight = RedisInFlight(
        reactor,
        coordinator,
        store,
        replica,
        LocalInFlight(config.max_upstream_fetches),
        lease=cluster.lease,
        stall=config.read_timeout,
    )
    freshness = RedisTagFreshness(reactor, coordinator, replica)
    usage = ClusterUsage(
        reactor,
        coordinator,
        max_size=config.max_size,
        low=int(config.max_size * config.low_watermark),
    )
    return ClusterParts(coordinator, inflight, freshness, usage, replica)


def add_cluster(
    top: service.MultiService,
    parts: ClusterParts,
    config: Config,
    reactor: Any,
    store: Store,
    *,
    run_in_thread: RunInThread,
    on_removed: Callable[[Kind, Digest], None],
) -> ClusterReaper:
    """The coordinator first (it stops last), then what uses it, then the reaper."""
    parts.coordinator.setServiceParent(top)
    _Started(parts.inflight.start, parts.inflight.stop).setServiceParent(top)
    _Started(parts.usage.start, parts.usage.stop).setServiceParent(top)
    reaper = ClusterReaper(
        reactor,
        parts.coordinator,
        store,
        parts.usage,
        parts.replica,
        run_in_thread=run_in_thread,
        in_use=parts.inflight.in_use,
        on_removed=on_removed,
        ttl=config.ttl,
        max_size=config.max_size,
        high=config.high_watermark,
        low=config.low_watermark,
        interval=config.reaper_interval,
    )
    reaper.setServiceParent(top)
    return reaper
