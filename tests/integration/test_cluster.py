"""Three replicas (twistd) over one shared store, coordinated by a real redis-server: one
cache. The upstream is the real registry behind a counting (and throttled) proxy."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MakeMirror
from tests.integration.test_blobs import Transfer, get_streaming
from tests.support.images import Blob, Image
from tests.support.mirror import Mirror
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import connect, request
from tests.support.redis import RedisServer
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.wait import poll_until

MiB = 1024 * 1024
FreshBlob = Callable[[int], tuple[str, Blob]]


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Replicas:
    """Replicas sharing one store and one Redis; what a test asks of them as a whole."""

    def __init__(self, mirrors: list[Mirror], root: Path, redis: RedisServer) -> None:
        self.mirrors = mirrors
        self.root = root
        self.redis = redis

    def __getitem__(self, i: int) -> Mirror:
        return self.mirrors[i]

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        return self.root / "blobs" / algorithm / hex_[:2] / hex_

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def metric(self, i: int, name: str) -> float:
        text = request(self.mirrors[i].url, "GET", "/metrics").body.decode()
        labels = "" if "{" in name else r"(?:\{[^}]*\})?"
        found = re.findall(rf"^{re.escape(name)}{labels} (\S+)$", text, re.M)
        return sum(float(v) for v in found)

    def connected(self) -> bool:
        return all(self.metric(i, "regmirror_cluster_connected") == 1 for i in range(len(self)))

    def __len__(self) -> int:
        return len(self.mirrors)


MakeReplicas = Callable[..., Replicas]


@pytest.fixture
def make_replicas(
    make_mirror: MakeMirror, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> MakeReplicas:
    def make(upstream_url: str, n: int = 3, ttl: str | None = None, **regmirror: Any) -> Replicas:
        root = tmp_path_factory.mktemp("shared-store")
        mirrors = []
        for i in range(n):
            extra: dict[str, Any] = {
                "storage": {"filesystem": {"rootdirectory": str(root)}},
                "regmirror": {
                    "cluster": {"redis": redis_server.url, "replica": f"r{i}", "lease": "3s"},
                    **regmirror,
                },
            }
            if ttl is not None:
                extra["proxy"] = {"ttl": ttl}
            mirrors.append(make_mirror(upstream_url, extra=extra, tag_freshness="5s"))
        replicas = Replicas(mirrors, root, redis_server)
        poll_until(replicas.connected, 20, what="every replica connected to Redis")
        return replicas

    return make


def run_clients(targets: list[tuple[str, str]], timeout: float = 180) -> list[Transfer]:
    """GET each (base URL, target) in its own thread, released together."""
    barrier = threading.Barrier(len(targets))
    results: list[Transfer | BaseException | None] = [None] * len(targets)

    def client(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = get_streaming(*targets[i])
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "clients still reading"
    out = []
    for i, result in enumerate(results):
        assert isinstance(result, Transfer), f"client {i}: {result!r}"
        out.append(result)
    return out


def assert_right(transfers: list[Transfer], blob: Blob) -> None:
    for i, t in enumerate(transfers):
        assert t.complete, f"client {i}: transfer broken: {t.error!r}"
        assert t.status == 200, f"client {i}: {t.status}"
        assert (t.size, t.sha256) == (blob.size, blob.digest), f"client {i}"


def test_thirty_clients_over_three_replicas_one_upstream_fetch(
    upstream_proxy: CountingProxy, make_replicas: MakeReplicas, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(16 * MiB)
    replicas = make_replicas(upstream_proxy.url)
    upstream_proxy.set_rate_limit(8 * MiB)  # ~2 s for the blob: every client joins it
    target = f"/v2/{name}/blobs/{blob.digest}"
    transfers = run_clients([(replicas[i % 3].url, target) for i in range(30)])
    assert_right(transfers, blob)
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
    assert upstream_proxy.bytes_down < 2 * blob.size
    poll_until(lambda: replicas.has_blob(blob.digest), 20, what="the blob in the store")
    followed = [replicas.metric(i, "regmirror_upstream_blob_fetches_total") for i in range(3)]
    assert sorted(followed) == [0, 0, 1]  # one replica fetched, two followed it


def test_every_replica_is_ready_and_shows_the_clusters_store_without_an_admin_socket(
    upstream_proxy: CountingProxy, make_replicas: MakeReplicas, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(1 * MiB)
    replicas = make_replicas(upstream_proxy.url, n=2, reaper_interval="1s")
    assert_right([get_streaming(replicas[0].url, f"/v2/{name}/blobs/{blob.digest}")], blob)

    def store_of(i: int) -> dict[str, Any]:
        found: dict[str, Any] = request(replicas[i].url, "GET", "/status.json").json()["store"]
        return found

    for i in range(2):  # replica 1 never saw the blob: its page reads the cluster's ledger
        poll_until(
            lambda i=i: (store_of(i)["bytes"], store_of(i)["entries"]) == (blob.size, 1),
            20,
            what=f"replica {i}'s status page to count the blob",
        )
        ready = request(replicas[i].url, "GET", "/readyz")
        assert ready.status == 200 and ready.json()["checks"]["state_loaded"]["ok"]
    assert not (replicas.root / "_state" / "admin.sock").exists()  # purge is not safe here


def test_three_skopeo_pulls_one_per_replica_fetch_each_blob_once(
    upstream_proxy: CountingProxy,
    make_replicas: MakeReplicas,
    images: dict[str, Image],
    tmp_path: Path,
) -> None:
    replicas = make_replicas(upstream_proxy.url)
    image = images["schema2"]
    errors: list[BaseException] = []

    def pull(i: int) -> None:
        try:
            dest = tmp_path / f"pull-{i}"
            skopeo_copy(image.ref(replicas[i].host), dest)
            assert verify_dir(dest, image).blob_digests == {b.digest for b in image.blobs()}
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for blob in image.blobs():
        assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1, blob.digest


def test_tag_checks_spread_over_replicas_ask_upstream_once_per_window(
    upstream_proxy: CountingProxy, make_replicas: MakeReplicas, images: dict[str, Image]
) -> None:
    replicas = make_replicas(upstream_proxy.url)
    image = images["schema2"]
    tag = image.tags[0]
    name = image.name
    target = f"/v2/{name}/manifests/{tag}"
    accept = {"Accept": image.media_type}

    def ask_all(method: str) -> None:
        barrier = threading.Barrier(9)
        statuses: list[int] = []

        def one(i: int) -> None:
            barrier.wait(30)
            statuses.append(request(replicas[i % 3].url, method, target, headers=accept).status)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert statuses == [200] * 9

    def upstream_asked() -> int:
        return upstream_proxy.count_requests(None, f"/manifests/{tag}")

    ask_all("GET")  # cold everywhere: one GET upstream for the three replicas
    assert upstream_asked() == 1
    ask_all("HEAD")  # within the window: nobody asks
    assert upstream_asked() == 1
    first = time.monotonic()
    poll_until(lambda: time.monotonic() - first > 5.5, 10, what="the freshness window to pass")
    ask_all("HEAD")  # the next window: one replica revalidates, for all of them
    assert upstream_asked() == 2


def holder_of(replicas: Replicas) -> list[int]:
    """The replicas whose temporary directory holds a file (a fetch in flight)."""
    found = []
    for i in range(len(replicas)):
        directory = replicas.root / "_tmp" / f"r{i}"
        if directory.is_dir() and any(p.is_file() for p in directory.iterdir()):
            found.append(i)
    return found


def test_a_replica_killed_mid_fetch_the_others_finish_never_a_wrong_body(
    upstream_proxy: CountingProxy, make_replicas: MakeReplicas, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(12 * MiB)
    replicas = make_replicas(upstream_proxy.url)
    upstream_proxy.set_rate_limit(2 * MiB)  # ~6 s: time to kill the holder mid-way
    target = f"/v2/{name}/blobs/{blob.digest}"
    results: list[Transfer] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        t = get_streaming(replicas[i % 3].url, target)
        with lock:
            results.append(t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    [holder] = poll_until(lambda: holder_of(replicas), 20, what="a replica fetching the blob")
    poll_until(lambda: upstream_proxy.bytes_down > blob.size // 4, 30, what="a quarter fetched")
    replicas[holder].kill9()
    for t in threads:
        t.join(120)
    upstream_proxy.set_rate_limit(None)
    assert len(results) == 6
    for t in results:  # no client got a complete body that is wrong: cut, or right
        assert t.size <= blob.size
        if t.status == 200 and t.size == blob.size:
            assert t.sha256 == blob.digest
    # The others finish: their clients ask again, through the surviving replicas.
    survivors = [i for i in range(3) if i != holder]
    again = run_clients([(replicas[i].url, target) for i in survivors for _ in range(2)])
    assert_right(again, blob)
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") <= 2
    poll_until(lambda: replicas.has_blob(blob.digest), 20, what="the blob in the store")


def test_a_slow_reader_keeps_content_past_its_expiry_then_it_leaves_once(
    upstream_proxy: CountingProxy, make_replicas: MakeReplicas, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(24 * MiB)
    replicas = make_replicas(upstream_proxy.url, ttl="3s", reaper_interval="1s")
    target = f"/v2/{name}/blobs/{blob.digest}"
    assert_right(run_clients([(replicas[0].url, target)]), blob)
    conn = connect(replicas[1].url, timeout=60)
    conn.request("GET", target)
    response = conn.getresponse()
    digest = hashlib.sha256(response.read(1 * MiB))
    started = time.monotonic()
    # Past its TTL, several reaper ticks: a slow client still holds it.
    poll_until(lambda: time.monotonic() - started > 6, 10, what="the blob's expiry")
    assert replicas.has_blob(blob.digest)
    size = 1 * MiB
    while chunk := response.read(1 * MiB):
        digest.update(chunk)
        size += len(chunk)
    conn.close()
    assert (size, "sha256:" + digest.hexdigest()) == (blob.size, blob.digest)
    poll_until(lambda: not replicas.has_blob(blob.digest), 20, what="the expired blob removed")

    def removed() -> float:
        return sum(
            replicas.metric(i, 'regmirror_reaper_removed_total{why="expired"}') for i in range(3)
        )

    # counted once the removal's thread is back on the reactor: just after the file went
    poll_until(lambda: removed() >= 1, 10, what="the removal counted")
    assert removed() == 1
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1


def test_redis_restarted_mid_run_replicas_serve_alone_then_rejoin(
    upstream_proxy: CountingProxy,
    make_replicas: MakeReplicas,
    fresh_blob: FreshBlob,
    redis_server: RedisServer,
) -> None:
    replicas = make_replicas(upstream_proxy.url)
    cached_name, cached = fresh_blob(2 * MiB)
    cached_target = f"/v2/{cached_name}/blobs/{cached.digest}"
    assert_right(run_clients([(replicas[0].url, cached_target)]), cached)
    redis_server.kill9()
    poll_until(
        lambda: all(replicas.metric(i, "regmirror_cluster_connected") == 0 for i in range(3)),
        20,
        what="every replica to notice the outage",
    )
    # Cached content keeps being served, by every replica.
    assert_right(run_clients([(replicas[i].url, cached_target) for i in range(3)]), cached)
    # Cold content too, each replica on its own.
    cold_name, cold = fresh_blob(2 * MiB)
    cold_target = f"/v2/{cold_name}/blobs/{cold.digest}"
    assert_right(run_clients([(replicas[i].url, cold_target) for i in range(3)]), cold)
    assert 1 <= upstream_proxy.count_requests("GET", f"/blobs/{cold.digest}") <= 3
    assert "now works alone" in replicas[0].log_text()
    redis_server.start()
    poll_until(replicas.connected, 30, what="every replica to rejoin")
    assert "rejoined the cluster" in replicas[0].log_text()
    # Back as one cache: a cold blob asked of all three comes from upstream once.
    upstream_proxy.set_rate_limit(4 * MiB)
    name, blob = fresh_blob(8 * MiB)
    target = f"/v2/{name}/blobs/{blob.digest}"
    assert_right(run_clients([(replicas[i % 3].url, target) for i in range(9)]), blob)
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
