"""Upstream faults, one at a time, against a real mirror and a real registry.

For each fault: one blob is cached first; then the fault is switched on in the proxy
between the mirror and the registry, and clients ask at once for the cached blob and
for blobs the mirror does not have yet. The checker (``tests.support.faultclient``)
classifies every answer; what must hold:

* no client gets a complete ``200`` (or ``206``) whose bytes are not the blob's, and
  every error carries the spec's JSON body;
* the cached blob is served, verified, throughout;
* on disk: only blobs that hash to their names, nothing left in ``_tmp``, no fetch in
  flight once the clients are answered;
* the upstream heals: every blob is then served verified, fetched once more each.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import FAST, Blobs, StartMirror, check_store, crashed
from tests.faults.figures import Figures, record, scale
from tests.support.faultclient import Checker, Outcome
from tests.support.faultprocess import fd_count, fd_links, metric
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.images import Blob, make_blob, push_blob
from tests.support.mirror import Mirror
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Case:
    name: str
    fault: Fault
    options: dict[str, Any] = field(default_factory=dict)
    # What a client asking for an uncached blob may get while the fault lasts.
    kinds: frozenset[str] = frozenset({"broken", "error"})
    statuses: frozenset[int] = frozenset({502, 503, 504, 500})


CASES = [
    Case("upstream killed mid-blob", Fault.KILL, {"after": 300 * KiB}),
    Case("connections reset", Fault.RESET, {"after": 200 * KiB}),
    Case("truncated body", Fault.TRUNCATE, {"after": 400 * KiB}),
    Case("wrong bytes", Fault.WRONG, {"after": 100 * KiB}),
    Case("500 Internal Server Error", Fault.STATUS, {"status": 500}, frozenset({"error"})),
    Case("502 Bad Gateway", Fault.STATUS, {"status": 502}, frozenset({"error"})),
    Case("503 Service Unavailable", Fault.STATUS, {"status": 503}, frozenset({"error"})),
    Case(
        "429 with Retry-After",
        Fault.RATE_LIMIT,
        {"retry_after": 7},
        frozenset({"error"}),
        frozenset({429}),
    ),
    Case("black-holed upstream", Fault.BLACKHOLE, {}, frozenset({"error"})),
    Case("connection refused", Fault.REFUSE, {}, frozenset({"error"})),
]


def blob_target(name: str, blob: Blob) -> str:
    return f"/v2/{name}/blobs/{blob.digest}"


def wait_quiet(mirror: Mirror, what: str) -> None:
    """No fetch in flight and nothing in ``_tmp`` (polled: a failed fetch's cleanup
    may finish just after its clients were answered)."""
    poll_until(
        lambda: metric(mirror.url, "regmirror_fetches_in_flight") == 0 and not mirror.tmp_files(),
        15,
        what=f"no fetch in flight and an empty _tmp ({what})",
        describe=lambda: f"_tmp: {mirror.tmp_files()}\n{mirror.log_tail(30)}",
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_upstream_fault_serves_only_verified_bytes_and_recovers(
    case: Case, fault_proxy: FaultProxy, start_mirror: StartMirror, blobs: Blobs
) -> None:
    started = time.monotonic()
    size = scale(1, 4) * MiB
    name, made = blobs(scale(4, 8), size)
    cached, cold = made[0], made[1:]
    mirror = start_mirror()
    checker = Checker(mirror.url, timeout=30)

    async def first() -> Outcome:
        return await checker.get(blob_target(name, cached), cached.data)

    assert asyncio.run(first()).kind == "verified"
    poll_until(lambda: mirror.has_blob(cached.digest), 10, what="the first blob committed")
    wait_quiet(mirror, "before the fault")
    pid = mirror.pid
    assert pid is not None
    baseline_fds = fd_count(pid, ignore_peer_port=fault_proxy.port)

    fault_proxy.set_fault(case.fault, **case.options)
    rounds = scale(2, 5)

    async def during() -> list[tuple[Blob, str, Outcome]]:
        jobs = []
        for _ in range(rounds):
            for blob in cold:
                jobs.append((blob, "GET", checker.get(blob_target(name, blob), blob.data)))
                jobs.append(
                    (blob, "HEAD", checker.get(blob_target(name, blob), blob.data, method="HEAD"))
                )
            jobs.append((cached, "GET", checker.get(blob_target(name, cached), cached.data)))
            jobs.append(
                (
                    cached,
                    "RANGE",
                    checker.get(blob_target(name, cached), cached.data, byte_range=(10, 5000)),
                )
            )
        outcomes = await asyncio.gather(*(job for _, _, job in jobs))
        return [(b, m, o) for (b, m, _), o in zip(jobs, outcomes, strict=True)]

    results = asyncio.run(during())
    assert checker.tally.unverified_bytes_served == 0, checker.tally.unexpected
    assert not checker.tally.unexpected, checker.tally.unexpected
    for blob, method, outcome in results:
        if blob is cached:
            assert outcome.kind == "verified", f"cached blob under {case.name}: {outcome}"
            continue
        if method == "HEAD":
            # A HEAD is answered from upstream headers: it may be right even when the
            # body would be broken; an error otherwise.
            assert outcome.kind in ("verified", "error"), outcome
            continue
        assert outcome.kind in case.kinds, f"{case.name}: {outcome}"
        if outcome.kind == "error":
            assert outcome.status in case.statuses, outcome
    if case.fault is Fault.RATE_LIMIT:
        limited = [o for b, m, o in results if b is not cached and m == "GET"]
        assert all(o.retry_after == "7" for o in limited), limited
    assert fault_proxy.faulted() >= 1 or case.fault is Fault.REFUSE

    wait_quiet(mirror, f"under {case.name}")
    for blob in cold:
        assert not mirror.has_blob(blob.digest), f"{blob.digest} stored under {case.name}"
    assert check_store(mirror) == []

    # Healed: every blob verified, each fetched once more, by three clients at once.
    fault_proxy.heal()
    before = {b.digest: fault_proxy.count("GET", b.digest) for b in cold}

    async def after() -> list[Outcome]:
        return await asyncio.gather(
            *(checker.get(blob_target(name, blob), blob.data) for blob in made for _ in range(3))
        )

    healed = poll_until(
        lambda: (o := asyncio.run(after())) and all(x.kind == "verified" for x in o) and o,
        15,
        what=f"every blob served verified after {case.name} healed",
        describe=lambda: checker.tally.summary() + "\n" + mirror.log_tail(30),
    )
    assert len(healed) == 3 * len(made)
    assert checker.tally.unverified_bytes_served == 0, checker.tally.unexpected
    wait_quiet(mirror, "after healing")
    for blob in made:
        assert mirror.blob_sha256(blob.digest) == blob.digest
    fds = poll_until(
        lambda: (
            ((n := fd_count(pid, ignore_peer_port=fault_proxy.port)) <= baseline_fds and n) or None
        ),
        15,
        what=f"the mirror's open fds (but idle upstream connections) back to {baseline_fds}",
        describe=lambda: f"{fd_count(pid)}: {fd_links(pid)}",
    )
    fetched = {b.digest: fault_proxy.count("GET", b.digest) - before[b.digest] for b in cold}
    assert all(n >= 1 for n in fetched.values()), fetched
    lost = 0 if mirror.blob_sha256(cached.digest) == cached.digest else cached.size
    crashes = crashed(mirror)
    assert (lost, crashes) == (0, 0)
    tally = checker.tally
    record(
        Figures(
            group="single node",
            fault=case.name,
            requests=tally.requests,
            bodies_verified=tally.verified,
            unverified_bytes_served=tally.unverified_bytes_served,
            verified_bytes_lost=lost,
            crashes=crashes,
            fd_drift=fds - baseline_fds,
            duplicate_upstream_fetches=sum(n - 1 for n in fetched.values()),
            notes=f"{len(cold)} cold blobs of {size // KiB} KiB x {rounds} rounds; "
            + ", ".join(f"{k} {n}" for k, n in sorted(tally.kinds.items())),
            seconds=round(time.monotonic() - started, 1),
        )
    )


def test_slow_drip_upstream_feeds_every_waiting_client_from_one_fetch(
    fault_proxy: FaultProxy, start_mirror: StartMirror, blobs: Blobs
) -> None:
    """A few KB/s from upstream: clients asking meanwhile join the one fetch and wait
    (the read timeout is between bytes, not for the whole body); cached content is
    served at full speed meanwhile; everyone gets the verified blob."""
    started = time.monotonic()
    rate = 8 * KiB
    size = scale(32, 192) * KiB  # 4 s in CI, 24 s long
    name, (cached, slow) = blobs(2, size)
    mirror = start_mirror()
    checker = Checker(mirror.url, timeout=size / rate * 3 + 10)

    async def warm() -> Outcome:
        return await checker.get(blob_target(name, cached), cached.data)

    assert asyncio.run(warm()).kind == "verified"
    fault_proxy.set_fault(Fault.DRIP, rate=rate)
    waiting = scale(8, 32)

    async def drip() -> tuple[list[Outcome], list[float]]:
        slow_gets = [
            asyncio.ensure_future(checker.get(blob_target(name, slow), slow.data))
            for _ in range(waiting)
        ]
        hit_times = []
        # While the drip runs, the cached blob is served as fast as ever.
        while not all(f.done() for f in slow_gets):
            t0 = time.monotonic()
            hit = await checker.get(blob_target(name, cached), cached.data)
            hit_times.append(time.monotonic() - t0)
            assert hit.kind == "verified", hit
            await asyncio.wait(slow_gets, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        return [f.result() for f in slow_gets], hit_times

    outcomes, hit_times = asyncio.run(drip())
    elapsed = time.monotonic() - started
    assert checker.tally.unverified_bytes_served == 0, checker.tally.unexpected
    assert all(o.kind == "verified" for o in outcomes), outcomes
    fetches = fault_proxy.count("GET", slow.digest)
    assert fetches == 1, f"{fetches} upstream GETs for one blob with {waiting} clients"
    assert size / rate * 0.8 < elapsed, "the drip did not slow the fetch down"
    wait_quiet(mirror, "after the drip")
    assert mirror.blob_sha256(slow.digest) == slow.digest
    assert check_store(mirror) == []
    crashes = crashed(mirror)
    assert crashes == 0
    record(
        Figures(
            group="single node",
            fault="slow drip (8 KiB/s), clients waiting",
            requests=checker.tally.requests,
            bodies_verified=checker.tally.verified,
            crashes=crashes,
            duplicate_upstream_fetches=fetches - 1,
            notes=f"{waiting} clients on one {size // KiB} KiB blob; cached hits meanwhile: "
            f"{len(hit_times)}, slowest {max(hit_times) * 1000:.0f} ms",
            seconds=round(elapsed, 1),
        )
    )


def test_the_upstream_registry_killed_mid_blob_then_restarted(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The real thing rather than the proxy's imitation: docker-registry itself gets
    SIGKILL while blobs stream (dripped, so that they are mid-way), and comes back
    on the same port with the same storage."""
    started = time.monotonic()
    registry = UpstreamRegistry(tmp_path / "upstream")
    registry.start()
    proxy = FaultProxy(registry.url)
    proxy.start()
    mirror = Mirror(
        tmp_path_factory.mktemp("fault-mirror"), proxy.url, extra=FAST, log_level="info"
    )
    try:
        name = "faults/killed/registry"
        # Larger than what the kernel buffers between the registry and the proxy, so
        # that most of each blob is still in the registry when it dies.
        size = scale(8, 32) * MiB
        made = [make_blob(f"{name}#{time.time_ns()}.{i}", size) for i in range(4)]
        for blob in made:
            push_blob(registry.url, name, blob)
        cached, cold = made[0], made[1:]
        mirror.start()
        checker = Checker(mirror.url, timeout=30)

        async def one(blob: Blob) -> Outcome:
            return await checker.get(blob_target(name, blob), blob.data)

        assert asyncio.run(one(cached)).kind == "verified"
        proxy.set_fault(Fault.DRIP, rate=512 * KiB)
        outcomes: list[Outcome] = []

        async def cold_gets() -> None:
            outcomes.extend(await asyncio.gather(*(one(b) for b in cold for _ in range(2))))

        clients = threading.Thread(target=asyncio.run, args=(cold_gets(),))
        clients.start()
        poll_until(
            lambda: sum(p.stat().st_size for p in mirror.tmp_files()) > 256 * KiB,
            15,
            what="cold fetches mid-way",
        )
        registry.kill9()
        proxy.heal()  # what the registry had sent before it died flows on, then stops
        clients.join(30)
        assert not clients.is_alive()
        assert all(o.kind in ("broken", "error") for o in outcomes), outcomes
        # Down: the cached blob is served; a miss is a clean error.
        assert asyncio.run(one(cached)).kind == "verified"
        down = asyncio.run(one(cold[0]))
        assert down.kind == "error" and down.status in (502, 503, 504), down
        wait_quiet(mirror, "with the upstream dead")
        assert not any(mirror.has_blob(b.digest) for b in cold)
        assert check_store(mirror) == []

        before = {b.digest: proxy.count("GET", b.digest) for b in cold}
        registry.start()  # same port, same storage
        healed = asyncio.run(_gather(one(b) for b in made))
        assert all(o.kind == "verified" for o in healed), healed
        wait_quiet(mirror, "after the upstream came back")
        for blob in made:
            assert mirror.blob_sha256(blob.digest) == blob.digest
        assert checker.tally.unverified_bytes_served == 0, checker.tally.unexpected
        assert not checker.tally.unexpected, checker.tally.unexpected
        crashes = crashed(mirror)
        assert crashes == 0
        duplicates = sum(max(0, proxy.count("GET", b.digest) - before[b.digest] - 1) for b in cold)
    finally:
        mirror.stop()
        proxy.stop()
        registry.stop()
    record(
        Figures(
            group="single node",
            fault="docker-registry killed -9 mid-blob, then restarted",
            requests=checker.tally.requests,
            bodies_verified=checker.tally.verified,
            unverified_bytes_served=checker.tally.unverified_bytes_served,
            verified_bytes_lost=0,
            crashes=crashes,
            duplicate_upstream_fetches=duplicates,
            notes=f"{len(cold)} cold blobs of {size // MiB} MiB, 2 clients each, dripped at "
            "512 KiB/s; " + ", ".join(f"{k} {n}" for k, n in sorted(checker.tally.kinds.items())),
            seconds=round(time.monotonic() - started, 1),
        )
    )


async def _gather(jobs: Any) -> list[Outcome]:
    return list(await asyncio.gather(*jobs))
