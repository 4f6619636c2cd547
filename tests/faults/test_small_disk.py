"""The store on a small tmpfs (mounted by the test, as root): quota eviction, then a full disk.

1. ``regmirror.max_size`` below the disk's size: fetching more than the quota evicts
   the least recently used blobs; the store stays under the quota; what is cached is
   served verified.
2. Another tenant fills the disk during a cold fetch: it fails cleanly (an error or a
   broken transfer, never a wrong body), the failure is counted as ``disk``, nothing
   is left in ``_tmp``, the mirror keeps running and keeps serving what it has.
3. A fetch that starts on the full disk is passed through to the client (verified
   before its last byte), not stored.
4. Space comes back: the same fetch succeeds and is stored verified.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from tests.faults.conftest import Blobs, StartMirror, check_store, crashed, stored_blob_files
from tests.faults.figures import Figures, record, scale
from tests.support.faultclient import Checker, Outcome
from tests.support.faultfs import SmallFS
from tests.support.faultprocess import metric
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.images import Blob
from tests.support.wait import poll_until

KiB = 1024
MiB = 1024 * KiB


def test_a_small_full_disk_evicts_fails_cleanly_and_keeps_serving(
    tmp_path: Path, fault_proxy: FaultProxy, start_mirror: StartMirror, blobs: Blobs
) -> None:
    started = time.monotonic()
    base = tmp_path / "mirror"
    quota = 4 * MiB
    size = 640 * KiB
    count = scale(10, 30)
    with SmallFS(base / "store", 12 * MiB) as fs:
        mirror = start_mirror(base_dir=base, extra={"regmirror": {"max_size": quota}})
        try:
            checker = Checker(mirror.url, timeout=30)
            name, made = blobs(count + 1, size)
            made, extra_blob = made[:count], made[count]

            def get(blob: Blob) -> Outcome:
                return asyncio.run(checker.get(f"/v2/{name}/blobs/{blob.digest}", blob.data))

            # 1. More than the quota, one after the other: the oldest are evicted.
            for blob in made:
                assert get(blob).kind == "verified"
            poll_until(
                lambda: metric(mirror.url, "regmirror_store_bytes") <= quota,
                15,
                what="the store back under its quota",
                describe=lambda: mirror.log_tail(20),
            )
            assert metric(mirror.url, "regmirror_reaper_removed_total") >= 1
            stored = {p.name for p in stored_blob_files(mirror)}
            assert made[-1].hex in stored, "the newest blob was evicted"
            assert made[0].hex not in stored, "nothing was evicted"
            assert check_store(mirror) == []
            kept = [b for b in made if b.hex in stored]
            for blob in kept:
                assert get(blob).kind == "verified"

            # 2. Another tenant fills the disk while a cold fetch is being written (the
            # upstream drips, so the fetch is in flight when the disk runs out).
            failures_before = metric(
                mirror.url, "regmirror_fetch_failures_total", 'reason="disk"', 0
            )
            fault_proxy.set_fault(Fault.DRIP, rate=256 * KiB)
            box: list[Outcome] = []
            client = threading.Thread(target=lambda: box.append(get(extra_blob)))
            client.start()
            poll_until(
                lambda: any(p.stat().st_size > 64 * KiB for p in mirror.tmp_files()),
                15,
                what="the cold fetch writing to _tmp",
            )
            fs.fill(leave=0)
            client.join(30)
            assert box, "the client never got an answer on a full disk"
            full = box[0]
            fault_proxy.heal()
            assert full.kind in ("error", "broken"), full
            if full.kind == "error":
                assert full.status in (500, 503, 507), full
            poll_until(
                lambda: (
                    metric(mirror.url, "regmirror_fetches_in_flight") == 0
                    and not mirror.tmp_files()
                ),
                15,
                what="no fetch in flight and an empty _tmp on a full disk",
                describe=lambda: f"{mirror.tmp_files()}\n{mirror.log_tail(20)}",
            )
            failures = metric(mirror.url, "regmirror_fetch_failures_total", 'reason="disk"', 0)
            assert failures > failures_before
            assert "disk full" in mirror.log_text()
            assert not mirror.has_blob(extra_blob.digest)
            assert check_store(mirror) == []
            # What is still cached is served (the quota may have evicted more to make
            # room; whatever is left must be right).
            still = [b for b in made if mirror.has_blob(b.digest)]
            for blob in still:
                assert get(blob).kind == "verified"
            assert mirror.running

            # 3. Still full when a fetch starts: the blob is passed through (its last
            # byte held back until it matched), not stored, and the log says why.
            fs.fill(leave=0)
            again = get(extra_blob)
            assert again.kind == "verified", again
            assert mirror.tmp_files() == []
            assert not mirror.has_blob(extra_blob.digest)
            assert "no room left on the store's disk" in mirror.log_text()

            # 4. Space again: the fetch succeeds, verified.
            fs.unfill()
            assert get(extra_blob).kind == "verified"
            poll_until(lambda: mirror.has_blob(extra_blob.digest), 10, what="the blob stored")
            assert mirror.blob_sha256(extra_blob.digest) == extra_blob.digest
            assert check_store(mirror) == []
            assert mirror.tmp_files() == []
            crashes = crashed(mirror)
            assert checker.tally.unverified_bytes_served == 0, checker.tally.unexpected
            assert not checker.tally.unexpected, checker.tally.unexpected
            assert crashes == 0
        finally:
            mirror.stop()  # before the unmount
    record(
        Figures(
            group="single node",
            fault="store on a small tmpfs: quota eviction, then the disk full",
            requests=checker.tally.requests,
            bodies_verified=checker.tally.verified,
            unverified_bytes_served=checker.tally.unverified_bytes_served,
            verified_bytes_lost=0,
            crashes=crashes,
            notes=f"{count} blobs of {size // KiB} KiB through a {quota // MiB} MiB quota on "
            f"a 12 MiB tmpfs; disk full mid-fetch: the client got {full.kind} {full.status}; "
            f"a fetch started on the full disk: passed through, {again.kind}",
            seconds=round(time.monotonic() - started, 1),
        )
    )
