"""``build()`` where the cluster and the local parts meet: a replica of a cluster serves
its probes and status page off the ``ClusterReaper`` and has no admin socket (purge and
fsck --repair use the local ledger); of the workers, only worker 1 runs the prefetch
policies. The tree is built on a MemoryReactorClock and not started: nothing listens,
nothing connects to Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from regmirror.app.service import build
from regmirror.config import Config, parse_config
from regmirror.expiry.clusterreaper import ClusterReaper
from regmirror.expiry.reaper import Reaper
from regmirror.http.site import RegistrySite
from regmirror.mirror.prefetch import PrefetchService

CLUSTER = {"redis": "redis://127.0.0.1:1"}  # never reached: the tree is not started


def config(root: Path, **regmirror: Any) -> Config:
    data: dict[str, Any] = {
        "storage": {"filesystem": {"rootdirectory": str(root)}},
        "proxy": {"remoteurl": "http://127.0.0.1:1"},
        "regmirror": {"prefetch": [{"repositories": ["library/alpine"]}], **regmirror},
    }
    return parse_config(data)[0]


def admin_sockets(top: service.MultiService) -> list[Any]:
    return [s for s in top if isinstance(getattr(s, "endpoint", None), UNIXServerEndpoint)]


def site_of(top: service.MultiService) -> RegistrySite:
    (site,) = [f for f in (getattr(s, "factory", None) for s in top) if isinstance(f, RegistrySite)]
    return site


def get(site: RegistrySite, child: bytes) -> Any:
    """What the operator page ``/<child>`` of the listener's site answers (JSON)."""
    request = DummyRequest([])
    body = site.resource.getStaticEntity(child).render(request)
    return json.loads(body if isinstance(body, bytes) else b"".join(request.written))


def prefetch_of(top: service.MultiService) -> PrefetchService:
    found = top.getServiceNamed("prefetch")
    assert isinstance(found, PrefetchService)
    return found


def test_one_process_has_its_admin_socket_and_runs_the_policies(tmp_path: Path) -> None:
    top = build(config(tmp_path), MemoryReactorClock())
    assert any(isinstance(s, Reaper) for s in top)
    assert len(admin_sockets(top)) == 1
    assert len(prefetch_of(top).runners) == 1


def test_a_replica_of_a_cluster_serves_its_pages_off_the_cluster_reaper_without_admin_socket(
    tmp_path: Path,
) -> None:
    top = build(config(tmp_path, cluster=CLUSTER, max_size=1000), MemoryReactorClock())
    assert any(isinstance(s, ClusterReaper) for s in top)
    assert not any(isinstance(s, Reaper) for s in top)
    assert admin_sockets(top) == []
    site = site_of(top)
    ready = get(site, b"readyz")
    assert ready["status"] == "ready", ready  # a ClusterReaper has nothing to load
    status = get(site, b"status.json")
    assert status["store"] == {
        "bytes": 0,  # as Redis last said: nothing yet
        "entries": 0,
        "reserved_bytes": 0,
        "max_bytes": 1000,
        "high_watermark_bytes": 950,
        "low_watermark_bytes": 850,
    }
    assert len(status["prefetch"]["policies"]) == 1  # a replica (not a worker) runs its own


def test_of_the_workers_only_the_first_runs_the_prefetch_policies(tmp_path: Path) -> None:
    clustered = config(tmp_path, cluster=CLUSTER)
    runners = [
        len(prefetch_of(build(clustered, MemoryReactorClock(), worker=w)).runners)
        for w in (1, 2, 3)
    ]
    assert runners == [1, 0, 0]
    top = build(clustered, MemoryReactorClock(), worker=2)
    assert get(site_of(top), b"status.json")["prefetch"]["policies"] == []
