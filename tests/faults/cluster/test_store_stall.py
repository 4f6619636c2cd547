"""The shared store stalls while the replicas serve: the store is an ext4 file system on
a loop device made by the test, frozen with ``fsfreeze`` (every write to it blocks, in
every replica; reads go on), as when the server of a shared file system stalls.

Chosen over a cgroup I/O throttle (this machine has cgroup v1, whose blkio throttle
does not see buffered writes: they are written back by the kernel's flusher threads, in
no replica's cgroup) and over SIGSTOP (that stops the process, tested in
test_pauses.py, not its I/O): a frozen file system stops exactly the writes, in the
threads that make them, and lets the rest of each process run."""

from __future__ import annotations

import time

from tests.faults.cluster.conftest import MakeCluster
from tests.faults.cluster.harness import (
    Checker,
    FreshBlob,
    MiB,
    background,
    elapsed,
    run_parallel,
)
from tests.faults.figures import Figures, record, scale
from tests.support.loopfs import LoopFs
from tests.support.wait import poll_until


def test_a_stalled_store_stops_writes_not_serving_and_loses_nothing(
    loopfs: LoopFs, make_cluster: MakeCluster, fresh_blob: FreshBlob
) -> None:
    started = time.monotonic()
    cluster = make_cluster(3, lease="1s", root=loopfs.mount / "store")
    check = Checker()
    cached_name, cached = fresh_blob(2 * MiB)
    assert check.get(cluster.url(0), cached_name, cached).complete
    cluster.baseline()
    held_name, held = fresh_blob(8 * MiB)
    redis = cluster.redis.client()
    base = cluster.upstream.bytes_down
    cluster.upstream.set_rate_limit(4 * MiB)
    slowest = 0.0
    stall = scale(3, 20)
    rounds = 0
    with background([check.job(cluster.url(i % 3), held_name, held) for i in range(6)]):
        poll_until(lambda: cluster.upstream.bytes_down > base + 2 * MiB, 20, what="2 MiB in")
        holder = redis.call("GET", f"regmirror:fetch|{held.digest}").split(" ")[0]
        with loopfs.frozen():
            frozen_at = time.monotonic()
            while not elapsed(frozen_at, stall)():
                t = time.monotonic()
                run_parallel([check.job(cluster.url(i), cached_name, cached) for i in range(3)])
                slowest = max(slowest, time.monotonic() - t)
                rounds += 1
                # the holder, whose writes are blocked, still renews its lease
                assert redis.call("GET", f"regmirror:fetch|{held.digest}").startswith(holder)
                assert not cluster.has_blob(held.digest)
        cluster.upstream.set_rate_limit(None)
    poll_until(lambda: not cluster.tmp_files(), 20, what="no temporary file left")

    verified = check.verified()
    figures = Figures(
        group="cluster",
        fault=f"shared store frozen (fsfreeze) {stall} s mid-fetch",
        requests=check.requests,
        bodies_verified=len(verified),
        unverified_bytes_served=check.unverified_bytes(),
        verified_bytes_lost=cluster.lost_bytes([cached, held]),
        crashes=cluster.crashes(),
        fd_drift=cluster.fd_drift(),
        rss_drift_mb=cluster.rss_drift_mb(),
        duplicate_upstream_fetches=cluster.duplicate_fetches([cached, held]),
        notes=(
            f"{rounds} rounds of cached GETs on every replica during the freeze, slowest "
            f"{slowest:.2f} s; the fetch in flight (holder {holder}, 5 followers) waited "
            "and finished after the thaw"
        ),
        seconds=round(time.monotonic() - started, 1),
    )
    record(figures)
    assert figures.unverified_bytes_served == 0
    assert figures.verified_bytes_lost == 0
    assert figures.crashes == 0
    assert len(verified) == check.requests, check.describe()
    assert cluster.upstream_gets(held) == 1
    assert slowest < 2.0, "cached content waited for the stalled store's writes"
