"""Fixtures of the cluster's fault suite: ``make_cluster`` starts a real redis-server
and N real twistd replicas over one shared store, fetching from the session's real
upstream registry through a counting proxy; ``isolated=i`` puts replica ``i`` in a
network namespace of the test's own, with one veth link for its clients and the upstream
and another for Redis alone (``cluster.redis_links[i].cut()`` partitions it from Redis
only). Everything is stopped by PID, and the namespace deleted, at teardown, also when
the test fails; a failing test's report gets the replicas' log tails.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.cluster.harness import Cluster, FaultMirror, NsRedis
from tests.integration.conftest import (  # noqa: F401 - fixtures used here
    _session_upstream,
    fresh_blob,
    images,
    integration_tools,
    upstream,
    upstream_proxy,
)
from tests.support.loopfs import LoopFs
from tests.support.netns import Link, NetNs
from tests.support.ports import LOOPBACK
from tests.support.proxy import CountingProxy
from tests.support.redis import RedisServer
from tests.support.relay import Relay
from tests.support.wait import poll_until

_LIVE: list[FaultMirror] = []

MakeCluster = Callable[..., Cluster]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("call", "setup"):
        for mirror in list(_LIVE):
            report.sections.append((f"replica {mirror.url} (log tail)", mirror.log_tail(40)))
    return report


@pytest.fixture
def loopfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    """An ext4 file system on a loop device, for a shared store the test can freeze."""
    fs = LoopFs(tmp_path_factory.mktemp("loopfs"))
    try:
        yield fs.create()
    finally:
        fs.unmount()


@pytest.fixture
def make_cluster(
    upstream_proxy: CountingProxy,  # noqa: F811 - the fixture imported above
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MakeCluster]:
    started: list[FaultMirror] = []
    cleanups: list[Callable[[], None]] = []

    def make(
        n: int = 3,
        *,
        lease: str = "1s",
        isolated: int | None = None,
        ttl: str | None = None,
        preamble: dict[int, str] | None = None,
        start: bool = True,
        root: Path | None = None,
        **regmirror: Any,
    ) -> Cluster:
        root = root or tmp_path_factory.mktemp("shared-store")
        ns: NetNs | None = None
        net: Link | None = None
        links: dict[int, Link] = {}
        binds: list[str] = []
        if isolated is not None:
            ns = NetNs().create()
            cleanups.append(ns.delete)
            net = ns.link()  # clients and the upstream
            links[isolated] = ns.link()  # Redis only
            binds.append(links[isolated].root_ip)
        redis: RedisServer = NsRedis(tmp_path_factory.mktemp("redis"), binds)
        redis.start()
        cleanups.append(redis.stop)
        mirrors: list[FaultMirror] = []
        for i in range(n):
            inside = i == isolated
            upstream_url = upstream_proxy.url
            redis_host = LOOPBACK
            if inside:
                assert ns is not None and net is not None
                relay = Relay(net.root_ip, LOOPBACK, upstream_proxy.port).start()
                cleanups.append(relay.stop)
                upstream_url, redis_host = relay.url, links[i].root_ip
            extra: dict[str, Any] = {
                "storage": {"filesystem": {"rootdirectory": str(root)}},
                "regmirror": {
                    "cluster": {
                        "redis": f"redis://{redis_host}:{redis.port}/0",
                        "replica": f"r{i}",
                        "lease": lease,
                    },
                    **regmirror,
                },
            }
            if ttl is not None:
                extra["proxy"] = {"ttl": ttl}
            mirror = FaultMirror(
                tmp_path_factory.mktemp(f"replica{i}"),
                upstream_url,
                listen_ip=net.ns_ip if inside and net is not None else LOOPBACK,
                tag_freshness="5s",
                extra=extra,
                ns=ns if inside else None,
                preamble=(preamble or {}).get(i, ""),
            )
            started.append(mirror)
            _LIVE.append(mirror)
            mirrors.append(mirror)
        cluster = Cluster(mirrors, root, redis, upstream_proxy, links)
        if start:
            for mirror in mirrors:
                mirror.start()
            poll_until(cluster.all_connected, 20, what="every replica connected to Redis")
        return cluster

    try:
        yield make
    finally:
        try:
            for mirror in reversed(started):
                try:
                    if mirror.running and mirror.pid is not None:
                        os.kill(mirror.pid, signal.SIGCONT)  # a paused one must hear SIGTERM
                    mirror.stop()
                finally:
                    if mirror in _LIVE:
                        _LIVE.remove(mirror)
        finally:
            for cleanup in reversed(cleanups):
                cleanup()
