"""A replica partitioned from Redis, but not from its clients or the upstream, then
healed: made with a network namespace of the test's own (the replica inside, one veth
link for its clients and the upstream, another for Redis alone; the partition sets the
root end of the Redis link down: inside, the link only loses its carrier and what the
replica sends is dropped, silence and no error, as when the network in between fails)."""

from __future__ import annotations

import threading
import time

from tests.faults.cluster.conftest import MakeCluster
from tests.faults.cluster.harness import Checker, FreshBlob, MiB, run_parallel
from tests.faults.figures import Figures, record, scale
from tests.support.images import Blob
from tests.support.wait import poll_until

ALONE = 2  # the replica in its own namespace


def test_a_replica_cut_off_from_redis_keeps_serving_and_rejoins(
    make_cluster: MakeCluster, fresh_blob: FreshBlob
) -> None:
    started = time.monotonic()
    cluster = make_cluster(3, isolated=ALONE, lease="1s")
    check = Checker()
    cached_name, cached = fresh_blob(2 * MiB)
    assert check.get(cluster.url(0), cached_name, cached).complete
    cluster.baseline()

    # A slow fetch held by the replica about to be cut off.
    held_name, held = fresh_blob(6 * MiB)
    cluster.upstream.set_rate_limit(3 * MiB)
    holder_dir = cluster.root / "_tmp" / f"r{ALONE}"
    first = threading.Thread(target=check.job(cluster.url(ALONE), held_name, held))
    first.start()
    poll_until(lambda: holder_dir.is_dir() and any(holder_dir.iterdir()), 20, what="r2 fetching")
    cluster.redis_links[ALONE].cut(silent=True)  # Redis's packets dropped, no error
    cut_at = time.monotonic()
    poll_until(lambda: not cluster.connected(ALONE), 10, what="r2 to say it works alone")
    assert all(cluster.connected(i) for i in (0, 1)), "the others lost Redis too"

    rounds = scale(2, 20)
    cold: list[Blob] = []
    for _ in range(rounds):
        # cached content from everyone; the held blob from the others (they follow the
        # cut-off replica's file, then fetch it themselves); a cold blob from everyone
        name, blob = fresh_blob(1 * MiB)
        cold.append(blob)
        run_parallel(
            [check.job(cluster.url(i), cached_name, cached) for i in range(3)]
            + [check.job(cluster.url(i), held_name, held) for i in (0, 1)]
            + [check.job(cluster.url(i % 3), name, blob) for i in range(6)]
        )
        assert not cluster.connected(ALONE)
    first.join(120)
    assert "now works alone" in cluster[ALONE].log_text()
    partition = time.monotonic() - cut_at

    cluster.redis_links[ALONE].heal()
    healed_at = time.monotonic()
    poll_until(lambda: cluster.connected(ALONE), 60, what="r2 to rejoin the cluster")
    rejoin = time.monotonic() - healed_at
    assert "rejoined the cluster" in cluster[ALONE].log_text()

    # One cache again: a cold blob asked of all three comes from upstream once.
    cluster.upstream.set_rate_limit(4 * MiB)
    name, after = fresh_blob(4 * MiB)
    run_parallel([check.job(cluster.url(i % 3), name, after) for i in range(9)])
    cluster.upstream.set_rate_limit(None)

    verified = check.verified()
    figures = Figures(
        group="cluster",
        fault="replica partitioned from Redis (netns), then healed",
        requests=check.requests,
        bodies_verified=len(verified),
        unverified_bytes_served=check.unverified_bytes(),
        verified_bytes_lost=cluster.lost_bytes(check.served_blobs()),
        crashes=cluster.crashes(),
        fd_drift=cluster.fd_drift(),
        rss_drift_mb=cluster.rss_drift_mb(),
        duplicate_upstream_fetches=cluster.duplicate_fetches([cached, held, *cold, after]),
        notes=(
            f"partition {partition:.1f} s, {rounds} rounds; rejoined {rejoin:.1f} s after the "
            f"heal; {check.cut()} transfers cut; the held blob fetched "
            f"{cluster.upstream_gets(held)}x, each cold blob at most twice"
        ),
        seconds=round(time.monotonic() - started, 1),
    )
    record(figures)
    assert figures.unverified_bytes_served == 0
    assert figures.verified_bytes_lost == 0
    assert figures.crashes == 0
    assert check.failed_statuses() == {}
    assert check.cut() == 0, check.describe()
    assert len(verified) == check.requests
    # the cut-off replica fetches alone; the two others share one fetch: at most two
    assert cluster.upstream_gets(held) <= 2
    assert all(cluster.upstream_gets(b) <= 2 for b in cold)
    assert cluster.upstream_gets(after) == 1
    assert cluster.upstream_gets(cached) == 1
