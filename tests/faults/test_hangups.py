"""Clients hanging up at random points, on cached blobs and on fetches in flight.

Each client picks a blob (cached, or cold and being fetched from an upstream that
drips at ~2 MiB/s per connection) and a point to go away at: before sending, in the
middle of its request head, after the request, or after a random number of body
bytes, with a FIN or an RST. One in ten reads to the end and verifies. Then:

* the mirror's open file descriptors come back to what they were before (polled);
* no fetch is stuck (``regmirror_fetches_in_flight`` and ``regmirror_blob_readers``
  back to 0, ``_tmp`` empty);
* every cold blob was fetched from upstream exactly once, and is stored verified,
  although most of its clients left before it was done.
"""

from __future__ import annotations

import asyncio
import random
import time

from tests.faults.conftest import Blobs, StartMirror, check_store, crashed
from tests.faults.figures import Figures, record, scale
from tests.support.faultclient import Checker
from tests.support.faultprocess import fd_count, fd_links, metric, rss_mb
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.images import Blob
from tests.support.mirror import Mirror
from tests.support.wait import poll_until

KiB = 1024
MiB = 1024 * KiB


def quiet(mirror: Mirror) -> bool:
    return (
        metric(mirror.url, "regmirror_fetches_in_flight") == 0
        and metric(mirror.url, "regmirror_blob_readers", default=0) == 0
        and not mirror.tmp_files()
    )


def test_clients_hanging_up_at_random_points_leak_nothing_and_cancel_no_fetch(
    fault_proxy: FaultProxy, start_mirror: StartMirror, blobs: Blobs
) -> None:
    started = time.monotonic()
    clients = scale(200, 1000)
    rng = random.Random(f"hangups-{time.time_ns()}")
    size = 1 * MiB
    name, made = blobs(scale(10, 24), size)
    hot, cold = made[: len(made) // 2], made[len(made) // 2 :]
    mirror = start_mirror()
    assert mirror.pid is not None
    checker = Checker(mirror.url, timeout=60)

    async def warm() -> None:
        for blob in hot:
            assert (await checker.get(f"/v2/{name}/blobs/{blob.digest}", blob.data)).kind == (
                "verified"
            )

    asyncio.run(warm())
    poll_until(lambda: quiet(mirror), 10, what="a quiet mirror before the baseline")
    baseline_fds = fd_count(mirror.pid)
    baseline_rss = rss_mb(mirror.pid)
    fault_proxy.set_fault(Fault.DRIP, rate=2 * MiB)

    async def one(blob: Blob, sem: asyncio.Semaphore) -> None:
        async with sem:
            point = rng.random()
            target = f"/v2/{name}/blobs/{blob.digest}"
            reset = rng.random() < 0.5
            if point < 0.1:
                await checker.get(target, blob.data)
            elif point < 0.2:
                await checker.get(target, blob.data, hangup_at="connect", reset=reset)
            elif point < 0.3:
                await checker.get(target, blob.data, hangup_at="head", reset=reset)
            elif point < 0.45:
                await checker.get(target, blob.data, hangup_at="sent", reset=reset)
            else:
                after = rng.randrange(1, size)
                await checker.get(target, blob.data, hangup_after=after, reset=reset)

    async def storm() -> None:
        sem = asyncio.Semaphore(100)
        picks = [rng.choice(made) for _ in range(clients)]
        await asyncio.gather(*(one(blob, sem) for blob in picks))

    asyncio.run(storm())
    assert checker.tally.unverified_bytes_served == 0, checker.tally.unexpected
    assert not checker.tally.unexpected, checker.tally.unexpected

    poll_until(
        lambda: quiet(mirror),
        30,
        what="no fetch in flight, no reader, an empty _tmp after the hang-ups",
        describe=lambda: mirror.log_tail(20),
    )
    fds = poll_until(
        lambda: ((n := fd_count(mirror.pid)) <= baseline_fds and n) or None,  # type: ignore[arg-type]
        20,
        what=f"the mirror's open fds back to the baseline of {baseline_fds}",
        describe=lambda: f"{fd_count(mirror.pid)} open: {sorted(fd_links(mirror.pid))}",  # type: ignore[arg-type]
    )
    fault_proxy.heal()
    fetches = {b.digest: fault_proxy.count("GET", b.digest) for b in cold}
    duplicates = sum(max(0, n - 1) for n in fetches.values())
    # A cold blob that no client happened to pick is fetched by nobody: ask for it now.

    async def finish() -> list[str]:
        out = []
        for blob in made:
            got = await checker.get(f"/v2/{name}/blobs/{blob.digest}", blob.data)
            out.append(got.kind)
        return out

    assert asyncio.run(finish()) == ["verified"] * len(made)
    for blob in cold:
        if fetches[blob.digest]:
            assert fault_proxy.count("GET", blob.digest) == fetches[blob.digest]
        assert mirror.blob_sha256(blob.digest) == blob.digest
    assert check_store(mirror) == []
    assert duplicates == 0, f"cold blobs fetched more than once: {fetches}"
    crashes = crashed(mirror)
    assert crashes == 0
    record(
        Figures(
            group="single node",
            fault=f"{clients} clients hanging up at random points",
            requests=checker.tally.requests,
            bodies_verified=checker.tally.verified,
            unverified_bytes_served=checker.tally.unverified_bytes_served,
            verified_bytes_lost=0,
            crashes=crashes,
            fd_drift=fds - baseline_fds,
            rss_drift_mb=round(rss_mb(mirror.pid) - baseline_rss, 1),  # type: ignore[arg-type]
            duplicate_upstream_fetches=duplicates,
            notes=f"{len(hot)} cached + {len(cold)} cold blobs of 1 MiB, 100 at a time; "
            + ", ".join(f"{k} {n}" for k, n in sorted(checker.tally.kinds.items())),
            seconds=round(time.monotonic() - started, 1),
        )
    )
