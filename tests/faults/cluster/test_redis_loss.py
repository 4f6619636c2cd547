"""Redis killed and started again on the same port with its data lost (``--save ""
--appendonly no``: the worst case), in the middle of fetches and of expiry."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from tests.faults.cluster.conftest import MakeCluster
from tests.faults.cluster.harness import (
    Checker,
    Cluster,
    FreshBlob,
    MiB,
    background,
    elapsed,
    run_parallel,
)
from tests.faults.figures import Figures, record, scale
from tests.support.images import Blob
from tests.support.rawhttp import connect
from tests.support.wait import poll_until

TTL = 8.0


def _lease_of(cluster: Cluster, blob: Blob) -> Callable[[], str | None]:
    """Who holds ``blob``'s fetch lease now."""

    def holder() -> str | None:
        held = cluster.redis.client().call("GET", f"regmirror:fetch|{blob.digest}")
        return held.split(" ")[0] if held else None

    return holder


def _following(cluster: Cluster, blob: Blob) -> Callable[[], bool]:
    """Two replicas log that they follow the fetch of ``blob``."""
    line = f"blob {blob.digest} is being fetched by replica"
    return lambda: sum(line in cluster[i].log_text() for i in range(len(cluster))) >= 2


def test_redis_restarted_empty_mid_fetch_and_mid_expiry_loses_nothing_in_use(
    make_cluster: MakeCluster, fresh_blob: FreshBlob
) -> None:
    started = time.monotonic()
    cluster = make_cluster(3, lease="1s", ttl=f"{TTL:g}s", reaper_interval="1s")
    cluster.baseline()
    check = Checker()
    # in the store before: one blob read slowly by a client of r1 across the restart,
    # one used again and again (its last use is recent; its file is older than the TTL)
    read_name, read = fresh_blob(24 * MiB)  # more than the sockets' buffers hold
    hot_name, hot = fresh_blob(1 * MiB)
    run_parallel(
        [check.job(cluster.url(0), read_name, read), check.job(cluster.url(0), hot_name, hot)]
    )
    slow = connect(cluster.url(1), timeout=60)
    slow.request("GET", f"/v2/{read_name}/blobs/{read.digest}")
    response = slow.getresponse()
    sha = hashlib.sha256(response.read(1 * MiB))
    # past the TTL of both files (not of the hot one's uses): a restart forgets the uses
    stop = threading.Event()

    def use_hot() -> None:
        i = 0
        while not stop.wait(0.5):
            check.get(cluster.url(i % 3), hot_name, hot)
            i += 1

    user = threading.Thread(target=use_hot)
    user.start()
    poll_until(elapsed(time.monotonic(), TTL + 1), TTL + 5, what="the files' TTL to pass")

    rounds = scale(1, 5)
    fetched: list[Blob] = []
    restarts: list[float] = []
    for _ in range(rounds):
        name, blob = fresh_blob(6 * MiB)
        fetched.append(blob)
        cluster.upstream.set_rate_limit(2 * MiB)  # ~3 s: the restart falls in the middle
        clients = [check.job(cluster.url(i % 3), name, blob) for i in range(6)]
        base = cluster.upstream.bytes_down
        following = _following(cluster, blob)
        with background(clients):
            lease = _lease_of(cluster, blob)
            holder = poll_until(lease, 20, what="a lease holder")
            poll_until(following, 20, what="the two other replicas following the holder")
            poll_until(lambda: cluster.upstream.bytes_down > base + MiB, 20, what="1 MiB")  # noqa: B023
            cluster.redis.kill9()
            killed = time.monotonic()
            cluster.redis.start()  # same port, empty
            restarts.append(time.monotonic() - killed)
            # the holder takes its lease again at its next renewal
            poll_until(
                lambda: lease() == holder or cluster.has_blob(blob.digest),  # noqa: B023
                10,
                what="the holder to re-take its lease",
            )
            retaken = lease() == holder
        cluster.upstream.set_rate_limit(None)
        poll_until(cluster.all_connected, 30, what="every replica to rejoin")
        assert retaken or cluster.has_blob(blob.digest)

    # the next leader adopts the store; a few reaper ticks after the last restart
    poll_until(lambda: cluster.leader() is not None, 30, what="a reaper leader again")
    poll_until(elapsed(time.monotonic(), 3), 5, what="three reaper ticks")
    in_use_kept = cluster.has_blob(read.digest)
    stop.set()
    user.join(30)
    while chunk := response.read(1 * MiB):
        sha.update(chunk)
    slow.close()
    assert "sha256:" + sha.hexdigest() == read.digest, "the slow reader got a wrong body"
    # a hot blob deleted by the reaper would have been fetched again
    hot_kept = cluster.upstream_gets(hot) == 1

    blobs = [hot, *fetched]
    figures = Figures(
        group="cluster",
        fault="Redis killed and restarted empty mid-fetch and mid-expiry",
        requests=check.requests + 1,
        bodies_verified=len(check.verified()) + 1,
        unverified_bytes_served=check.unverified_bytes(),
        verified_bytes_lost=cluster.lost_bytes(fetched),
        crashes=cluster.crashes(),
        fd_drift=cluster.fd_drift(),
        rss_drift_mb=cluster.rss_drift_mb(),
        duplicate_upstream_fetches=cluster.duplicate_fetches(blobs),
        notes=(
            f"{rounds} restarts (Redis back in {max(restarts):.1f} s); {check.cut()} "
            f"transfers cut; blob read across the restart kept: {in_use_kept}; blob used "
            f"every 0.5 s (its file older than the TTL) never fetched again: {hot_kept}"
        ),
        seconds=round(time.monotonic() - started, 1),
    )
    record(figures)
    assert figures.unverified_bytes_served == 0
    assert figures.verified_bytes_lost == 0
    assert figures.crashes == 0
    assert check.failed_statuses() == {}
    assert in_use_kept, "the reaper deleted a blob being read"
    assert hot_kept, "the reaper deleted a blob used every half second"
    assert check.cut() == 0, check.describe()
    assert all(cluster.upstream_gets(b) <= 2 for b in fetched)
    assert all(cluster.has_blob(b.digest) for b in blobs)
