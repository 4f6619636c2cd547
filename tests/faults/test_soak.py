"""A soak: for a bounded time, 100+ connections mixing every kind of request.

Hits (cached blobs), misses (blobs not fetched yet, and digests upstream does not
have), HEADs, Range requests and bad requests (invalid digests and names, pushes),
from 120 concurrent clients for ``scale(20, 120)`` seconds. Every full body is
verified by the client; every error must carry the spec's JSON body with the status
its request deserves. Before and after (quiet): the mirror's RSS and open fds, whose
drift is reported and bounded.
"""

from __future__ import annotations

import asyncio
import random
import time

from tests.faults.conftest import Blobs, StartMirror, check_store, crashed
from tests.faults.figures import Figures, record, scale
from tests.support.faultclient import Checker
from tests.support.faultprocess import fd_count, fd_links, metric, rss_mb
from tests.support.faultproxy import FaultProxy
from tests.support.images import Blob, make_blob
from tests.support.mirror import Mirror
from tests.support.wait import poll_until

KiB = 1024
CONNECTIONS = 120


def quiet(mirror: Mirror) -> bool:
    return metric(mirror.url, "regmirror_fetches_in_flight") == 0 and not mirror.tmp_files()


def test_soak_of_mixed_requests_verifies_every_body_with_stable_rss_and_fds(
    fault_proxy: FaultProxy, start_mirror: StartMirror, blobs: Blobs
) -> None:
    seconds = scale(20, 120)
    rng = random.Random(f"soak-{time.time_ns()}")
    name, hot = blobs(8, 256 * KiB)
    cold_name, cold = blobs(scale(60, 400), 128 * KiB)
    absent = [make_blob(f"soak-absent-{i}", 1000) for i in range(5)]
    mirror = start_mirror()
    pid = mirror.pid
    assert pid is not None
    checker = Checker(mirror.url, timeout=60)

    async def warm() -> None:
        for blob in hot:
            got = await checker.get(f"/v2/{name}/blobs/{blob.digest}", blob.data, record=False)
            assert got.kind == "verified"

    # Warm up twice (allocator, connection pool), then measure.
    asyncio.run(warm())
    asyncio.run(warm())
    poll_until(lambda: quiet(mirror), 10, what="a quiet mirror before the soak")
    fds_before, rss_before = fd_count(pid), rss_mb(pid)
    errors_expected = 0
    mix: dict[str, int] = {}
    cold_left = list(cold)
    rng.shuffle(cold_left)

    async def client(deadline: float) -> None:
        nonlocal errors_expected
        while time.monotonic() < deadline:
            roll = rng.random()
            blob: Blob = rng.choice(hot)
            target = f"/v2/{name}/blobs/{blob.digest}"
            if roll < 0.35:
                kind = "hit"
                got = await checker.get(target, blob.data)
            elif roll < 0.5:
                kind = "miss"
                if cold_left:
                    miss = cold_left.pop()
                else:
                    miss = rng.choice(cold)
                got = await checker.get(f"/v2/{cold_name}/blobs/{miss.digest}", miss.data)
            elif roll < 0.6:
                kind = "head"
                got = await checker.get(target, blob.data, method="HEAD")
            elif roll < 0.75:
                kind = "range"
                first = rng.randrange(blob.size)
                last = rng.randrange(first, blob.size)
                got = await checker.get(target, blob.data, byte_range=(first, last))
            else:
                kind = "bad"
                target, status = rng.choice(
                    [
                        (f"/v2/{name}/blobs/sha256:{'z' * 64}", 400),
                        (f"/v2/{name}/blobs/sha256:abc", 400),
                        (f"/v2/UPPER/Case/blobs/{blob.digest}", 400),
                        (f"/v2/{name}/blobs/{rng.choice(absent).digest}", 404),
                        (f"/v2/{name}/manifests/no-such-tag-{rng.randrange(9)}", 404),
                    ]
                )
                got = await checker.get(target, None)
                errors_expected += 1
                assert got.kind == "error" and got.status == status, (target, got)
            mix[kind] = mix.get(kind, 0) + 1
            if kind != "bad":
                assert got.kind == "verified", (kind, target, got)

    async def soak() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(client(deadline) for _ in range(CONNECTIONS)))

    started = time.monotonic()
    asyncio.run(soak())
    elapsed = time.monotonic() - started
    tally = checker.tally
    assert tally.unverified_bytes_served == 0, tally.unexpected
    assert not tally.unexpected, tally.unexpected
    poll_until(lambda: quiet(mirror), 20, what="a quiet mirror after the soak")
    fds_after = poll_until(
        lambda: ((n := fd_count(pid)) <= fds_before + 2 and n) or None,
        20,
        what=f"open fds back near {fds_before}",
        describe=lambda: f"{fd_count(pid)}: {fd_links(pid)}",
    )
    rss_after = rss_mb(pid)
    assert rss_after - rss_before < 64, f"RSS grew {rss_before:.0f} -> {rss_after:.0f} MB"
    assert check_store(mirror) == []
    for blob in cold:
        if mirror.has_blob(blob.digest):
            assert fault_proxy.count("GET", blob.digest) == 1, blob.digest
    crashes = crashed(mirror)
    assert crashes == 0
    record(
        Figures(
            group="single node",
            fault=f"soak: {CONNECTIONS} connections for {seconds} s",
            requests=tally.requests,
            bodies_verified=tally.verified,
            unverified_bytes_served=tally.unverified_bytes_served,
            verified_bytes_lost=0,
            crashes=crashes,
            fd_drift=fds_after - fds_before,
            rss_drift_mb=round(rss_after - rss_before, 1),
            duplicate_upstream_fetches=sum(
                max(0, fault_proxy.count("GET", b.digest) - 1) for b in cold
            ),
            notes=f"{tally.requests / elapsed:.0f} requests/s; "
            + ", ".join(f"{k} {n}" for k, n in sorted(mix.items()))
            + f"; RSS {rss_before:.0f} -> {rss_after:.0f} MB",
            seconds=round(elapsed, 1),
        )
    )
