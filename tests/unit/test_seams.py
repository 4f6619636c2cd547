"""The seams that a cluster implements a second time (InFlight, TagFreshness): their
local implementations and fakes match the Protocols, and behave as documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import BlobFetch
from regmirror.fetch.inflight import FetchLease, FetchProgress, InFlight, LocalInFlight
from regmirror.mirror.freshness import LocalTagFreshness, TagFreshness, TagRef
from regmirror.mirror.manifests import Manifest, ManifestLRU
from regmirror.storage.store import Store
from regmirror.testing import FakeInFlight, FakeTagFreshness

T = SynchronousTestCase()
DATA = b"layer bytes"
DIGEST = Digest.of(DATA)


def _members(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [
        (InFlight, LocalInFlight),
        (InFlight, FakeInFlight),
        (TagFreshness, LocalTagFreshness),
        (TagFreshness, FakeTagFreshness),
    ],
)
def test_implementations_and_fakes_have_the_protocols_signatures(
    protocol: type, implementation: type
) -> None:
    assert _members(protocol)
    for name in _members(protocol):
        want = inspect.signature(getattr(protocol, name))
        got = inspect.signature(getattr(implementation, name))
        assert got == want, (implementation.__name__, name)
        assert inspect.iscoroutinefunction(getattr(implementation, name)) == (
            inspect.iscoroutinefunction(getattr(protocol, name))
        ), name


def _fetch(store: Store, lease: FetchLease, digest: Digest = DIGEST) -> BlobFetch:
    fetch = BlobFetch(store, digest, len(DATA), fsync=False, on_done=lease.ended)
    lease.started(fetch)
    return fetch


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path)
    store.prepare()
    return store


@pytest.mark.parametrize("make", [LocalInFlight, FakeInFlight])
def test_a_fetch_is_in_use_while_in_flight_or_read(make: type, store: Store) -> None:
    inflight: InFlight = make()
    starts: list[Deferred[None]] = []

    async def start(lease: FetchLease) -> BlobFetch:
        d: Deferred[None] = Deferred()
        starts.append(d)
        await d
        return _fetch(store, lease)

    joined = Deferred.fromCoroutine(inflight.join_or_start(DIGEST, start))
    assert not inflight.in_use(DIGEST)
    starts[0].callback(None)
    fetch = T.successResultOf(joined)
    assert inflight.fetch(DIGEST) is fetch and inflight.in_use(DIGEST) and inflight.count() == 1
    release = inflight.reading(DIGEST)
    fetch.write(DATA[:4])
    assert inflight.fetches() == [FetchProgress(DIGEST, 4, len(DATA), 1)]
    assert T.successResultOf(Deferred.fromCoroutine(inflight.join_or_start(DIGEST, start))) is (
        fetch
    )
    fetch.write(DATA[4:])  # verified and committed (inline writer)
    assert inflight.fetch(DIGEST) is None and inflight.count() == 0
    assert inflight.in_use(DIGEST) and inflight.readers() == 1  # still read
    release()
    release()  # once only
    assert not inflight.in_use(DIGEST) and inflight.readers() == 0
    assert dict(inflight.failures()) == {}


def test_concurrent_starts_share_one_and_wait_for_a_slot(store: Store) -> None:
    inflight = LocalInFlight(max_fetches=1)
    leases: list[FetchLease] = []

    other = Digest.of(b"other")

    async def start(lease: FetchLease) -> BlobFetch:
        leases.append(lease)
        return _fetch(store, lease, other if len(leases) > 1 else DIGEST)

    first = Deferred.fromCoroutine(inflight.join_or_start(DIGEST, start))
    second = Deferred.fromCoroutine(inflight.join_or_start(DIGEST, start))
    waiting = Deferred.fromCoroutine(inflight.join_or_start(other, start))
    assert len(leases) == 1 and inflight.active(DIGEST) and inflight.active(other)
    fetch = T.successResultOf(first)
    assert T.successResultOf(second) is fetch
    T.assertNoResult(waiting)  # the only slot is taken
    fetch.write(b"wrong bytes")  # a mismatch ends it: the slot is free
    assert dict(inflight.failures()) == {"digest": 1}
    assert len(leases) == 2
    assert T.successResultOf(waiting).digest == other


def test_a_start_that_fails_gives_its_slot_back() -> None:
    inflight = LocalInFlight(max_fetches=1)

    async def failing(lease: FetchLease) -> BlobFetch:
        raise ValueError("upstream said no")

    T.failureResultOf(Deferred.fromCoroutine(inflight.join_or_start(DIGEST, failing)), ValueError)
    T.failureResultOf(Deferred.fromCoroutine(inflight.join_or_start(DIGEST, failing)), ValueError)
    assert not inflight.active(DIGEST)


def test_a_tag_is_fresh_within_its_window_until_forgotten() -> None:
    clock = Clock()
    freshness = LocalTagFreshness(clock)
    tag, other = TagRef("up", "a", "1"), TagRef("up", "a", "2")
    assert not freshness.fresh(tag, "m", 30)
    freshness.checked(tag, "m", clock.seconds())
    clock.advance(29)
    assert freshness.fresh(tag, "m", 30)
    assert not freshness.fresh(tag, "other type", 30) and not freshness.fresh(other, "m", 30)
    assert not freshness.fresh(tag, "m", 0)
    clock.advance(1)
    assert not freshness.fresh(tag, "m", 30)
    freshness.checked(tag, "m", clock.seconds())
    freshness.forget(tag)
    assert not freshness.fresh(tag, "m", 30)


def test_the_manifest_lru_keeps_its_budget() -> None:
    lru = ManifestLRU(budget=10)
    one, two, three = (Manifest(Digest.of(b), b, "m") for b in (b"1111", b"2222", b"3333"))
    lru.remember(one)
    lru.remember(two)
    assert lru.get(one.digest) is one  # now the most recent
    lru.remember(three)
    assert lru.get(two.digest) is None and lru.bytes == 8 and len(lru) == 2
    lru.forget(one.digest)
    assert lru.get(one.digest) is None and lru.bytes == 4
