"""kill -9 of the mirror during concurrent cold fetches, again and again, on one store.

Each round pushes new blobs upstream, has clients ask for them (and for blobs cached
in earlier rounds) while the upstream drips them at ~1 MiB/s per connection, kills the
mirror with SIGKILL at a random moment, and starts it again on the same store. After
every restart: ``_tmp`` is empty, every file under ``blobs/`` hashes to its name,
every blob committed before the kill is still there, and the mirror serves them all.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

from tests.faults.conftest import Blobs, StartMirror, check_store, stored_blob_files
from tests.faults.figures import Figures, record, scale
from tests.support.faultclient import Checker, Outcome
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.images import Blob

KiB = 1024


def test_kill_9_during_cold_fetches_keeps_only_verified_blobs_and_serves_them_after_restart(
    fault_proxy: FaultProxy, start_mirror: StartMirror, blobs: Blobs
) -> None:
    started = time.monotonic()
    rounds = scale(20, 60)
    rng = random.Random(f"kill9-{time.time_ns()}")
    size = 512 * KiB
    mirror = start_mirror()
    checker = Checker(mirror.url, timeout=30)
    fault_proxy.set_fault(Fault.DRIP, rate=1024 * KiB)
    known: dict[str, tuple[str, Blob]] = {}  # digest -> (repository, blob)
    committed_total = 0
    lost = 0
    killed_with_fetches = 0
    for round_ in range(rounds):
        name, fresh = blobs(4, size)
        for blob in fresh:
            known[blob.digest] = (name, blob)
        stored_before = {p.name for p in stored_blob_files(mirror)}
        hits = [known[d] for d in rng.sample(sorted(known), min(3, len(known)))]
        outcomes: list[Outcome] = []

        async def clients(
            fresh: list[Blob] = fresh, name: str = name, hits=hits, outcomes=outcomes
        ) -> None:
            jobs = [checker.get(f"/v2/{name}/blobs/{b.digest}", b.data) for b in fresh]
            jobs += [checker.get(f"/v2/{n}/blobs/{b.digest}", b.data) for n, b in hits]
            outcomes.extend(await asyncio.gather(*jobs))

        thread = threading.Thread(target=asyncio.run, args=(clients(),), name="kill9-clients")
        thread.start()
        time.sleep(rng.uniform(0.0, 0.6))  # the random moment of the crash
        if mirror.tmp_files():
            killed_with_fetches += 1
        mirror.kill9()
        thread.join(60)
        assert not thread.is_alive(), "clients still waiting after the kill"
        assert checker.tally.unverified_bytes_served == 0, checker.tally.unexpected
        assert not checker.tally.unexpected, checker.tally.unexpected

        committed = {p.name for p in stored_blob_files(mirror) if p.suffix != ".type"}
        committed_total += len(committed - stored_before)
        mirror.start()  # the same store
        assert mirror.tmp_files() == [], f"round {round_}: _tmp not swept at start-up"
        assert check_store(mirror) == [], f"round {round_}: a stored blob does not hash"
        now = {p.name for p in stored_blob_files(mirror)}
        for hex_ in committed - now:
            lost += next(b.size for _, b in known.values() if b.hex == hex_)
        assert lost == 0, f"round {round_}: verified blobs vanished: {committed - now}"

        # The mirror serves what it has: every committed blob, verified, without
        # going upstream (HEAD too).
        async def served(committed: set[str] = committed) -> list[Outcome]:
            jobs = []
            for n, b in known.values():
                if b.hex in committed:
                    jobs.append(checker.get(f"/v2/{n}/blobs/{b.digest}", b.data))
                    jobs.append(checker.get(f"/v2/{n}/blobs/{b.digest}", b.data, method="HEAD"))
            return await asyncio.gather(*jobs)

        got = asyncio.run(served())
        assert all(o.kind == "verified" for o in got), [o for o in got if o.kind != "verified"]

    assert committed_total > 0, "no fetch ever completed: the kills came too early"
    assert killed_with_fetches > 0, "no kill ever met a fetch in flight"
    # Finally, healed and unhurried: everything is fetched and verified.
    fault_proxy.heal()

    async def everything() -> list[Outcome]:
        return await asyncio.gather(
            *(checker.get(f"/v2/{n}/blobs/{b.digest}", b.data) for n, b in known.values())
        )

    assert all(o.kind == "verified" for o in asyncio.run(everything()))
    assert check_store(mirror) == []
    assert mirror.running
    record(
        Figures(
            group="single node",
            fault=f"kill -9 during cold fetches, {rounds} times",
            requests=checker.tally.requests,
            bodies_verified=checker.tally.verified,
            unverified_bytes_served=checker.tally.unverified_bytes_served,
            verified_bytes_lost=lost,
            crashes=0,
            notes=f"{len(known)} blobs of {size // KiB} KiB; {killed_with_fetches} kills "
            f"with fetches in flight; {committed_total} blobs committed between kills",
            seconds=round(time.monotonic() - started, 1),
        )
    )
