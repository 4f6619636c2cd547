"""The Redis seams of a cluster against a real redis-server (fast: one per module, a
fresh cluster name per test): the coordinator's outage and return, shared tag checks,
one fetch per digest across replicas (followers never get the last byte before the
holder verified it; a dead holder's followers are cut), and the reaper's fencing."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed

from regmirror.config.model import RedisAddress
from regmirror.coord.redis import Coordinator, CoordinatorDown, sleep
from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.domain.media import Accept
from regmirror.expiry.clusterreaper import ClusterReaper, Fenced
from regmirror.expiry.clusterusage import ClusterUsage
from regmirror.fetch.blobfetch import BlobFetch, State
from regmirror.fetch.inflight import FetchLease, LocalInFlight
from regmirror.fetch.redisinflight import RedisInFlight
from regmirror.fetch.remote import RemoteFetch
from regmirror.fetch.writers import InlineWriter
from regmirror.mirror.freshness import Seen, TagRef, Turn
from regmirror.mirror.redisfreshness import RedisTagFreshness
from regmirror.storage.store import Store
from tests.support.redis import RedisServer

DATA = os.urandom(300_000)
DIGEST = Digest.of(DATA)
_names = itertools.count()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def until(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``check`` on the reactor until it is true (a deadline, no guessing)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await sleep(reactor, 0.02)


class Cluster:
    """Coordinators of one fresh cluster name, stopped at the end of the test."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.name = f"t{os.getpid()}-{next(_names)}"
        self.coordinators: list[Coordinator] = []

    async def coordinator(self) -> Coordinator:
        address = RedisAddress("127.0.0.1", self.server.port)
        coordinator = Coordinator(reactor, address, self.name, ping_interval=0.1)
        coordinator.startService()
        self.coordinators.append(coordinator)
        await until(lambda: coordinator.connected, what="the coordinator to connect")
        return coordinator

    async def stop(self) -> None:
        for coordinator in self.coordinators:
            await coordinator.stopService()


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    c = Cluster(redis_server)
    yield c
    pytest_twisted.blockon(Deferred.fromCoroutine(c.stop()))


# -- the coordinator -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_coordinator_says_when_redis_goes_and_comes_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    c = Cluster(server)
    try:
        coordinator = await c.coordinator()
        changes: list[bool] = []
        coordinator.on_change(changes.append)
        assert await coordinator.call("SET", coordinator.key("k"), "v") == "OK"
        server.kill9()
        await until(lambda: not coordinator.connected, what="the outage to be noticed")
        with pytest.raises(CoordinatorDown):
            await coordinator.call("GET", coordinator.key("k"))
        server.start()
        await until(lambda: coordinator.connected, what="the return to be noticed")
        assert changes == [False, True] and coordinator.outages == 1
        assert await coordinator.call("GET", coordinator.key("k")) is None  # empty again
    finally:
        await c.stop()
        server.stop()


# -- tag freshness -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_replica_checks_a_tag_the_others_get_what_it_found(cluster: Cluster) -> None:
    one = RedisTagFreshness(reactor, await cluster.coordinator(), "one", poll=0.01)
    two = RedisTagFreshness(reactor, await cluster.coordinator(), "two", poll=0.01)
    tag = TagRef("up", "library/alpine", "3.19")
    accept = Accept(frozenset({"application/vnd.oci.image.manifest.v1+json"}))
    turn = await one.settle(tag, accept, 30)
    assert isinstance(turn, Turn)
    waiting = Deferred.fromCoroutine(two.settle(tag, accept, 30))
    await sleep(reactor, 0.1)
    assert not waiting.called  # the other replica waits for the check in progress
    digest = "sha256:" + "a" * 64
    one.checked(tag, "application/vnd.oci.image.manifest.v1+json", reactor.seconds(), digest, 30)
    turn.done()
    seen = await waiting
    assert isinstance(seen, Seen) and seen.digest == digest
    assert two.fresh(tag, seen.media_type, 30)  # and within the window, without Redis
    assert abs(seen.when - reactor.seconds()) < 2
    # A client accepting another type is not served this check.
    other = Accept(frozenset({"application/vnd.docker.distribution.manifest.v2+json"}))
    assert isinstance(await two.settle(tag, other, 30), Turn)
    one.forget(tag)  # gone upstream: nobody serves the old check any more
    await sleep(reactor, 0.1)
    assert isinstance(await two.settle(tag, accept, 30), Turn)


@pytest_twisted.ensureDeferred
async def test_without_redis_every_replica_takes_its_own_turn(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    c = Cluster(server)
    try:
        freshness = RedisTagFreshness(reactor, await c.coordinator(), "one")
        server.kill9()
        await until(lambda: not c.coordinators[0].connected)
        settled = await freshness.settle(TagRef("up", "a", "b"), Accept(None), 30)
        assert isinstance(settled, Turn)
    finally:
        await c.stop()
        server.stop()


# -- fetches across replicas ---------------------------------------------------------


class Replica:
    def __init__(self, coordinator: Coordinator, root: Path, name: str, lease: float) -> None:
        self.store = Store(root, name)
        self.store.prepare()
        self.inflight = RedisInFlight(
            reactor,
            coordinator,
            self.store,
            name,
            LocalInFlight(),
            lease=lease,
            poll=0.05,
            heartbeat=0.2,
        )
        self.inflight.start()
        self.fetches: list[BlobFetch] = []
        self.leases: list[FetchLease] = []
        self.held: list[_HoldHash] = []

    def writer(self, fd: int, hasher: Any, size: int | None, fsync: bool, events: Any) -> Any:
        """The inline writer, its digest's verdict held until the test releases it."""
        held = _HoldHash(events)
        self.held.append(held)
        return InlineWriter(fd, hasher, size, fsync, held)

    async def start(self, lease: FetchLease) -> BlobFetch:
        fetch = BlobFetch(
            self.store, DIGEST, len(DATA), fsync=False, writer=self.writer, on_done=lease.ended
        )
        lease.started(fetch)
        self.fetches.append(fetch)
        self.leases.append(lease)
        return fetch


async def replicas(cluster: Cluster, root: Path, lease: float = 3.0) -> tuple[Replica, Replica]:
    a = Replica(await cluster.coordinator(), root, "a", lease)
    b = Replica(await cluster.coordinator(), root, "b", lease)
    return a, b


@pytest_twisted.ensureDeferred
async def test_a_second_replica_follows_the_fetch_and_never_gets_the_last_byte_early(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b = await replicas(cluster, tmp_path)
    try:
        mine = await a.inflight.join_or_start(DIGEST, a.start)
        followed = await b.inflight.join_or_start(DIGEST, b.start)
        assert isinstance(followed, RemoteFetch) and not b.fetches  # one fetch: a's
        assert followed.path == a.fetches[0].path
        assert b.inflight.active(DIGEST) and b.inflight.in_use(DIGEST)
        fetch = a.fetches[0]
        fetch.write(DATA[:100_000])
        await until(lambda: followed.readable() == 100_000, what="the follower to see bytes")
        # Every byte is on disk, the digest not checked yet: never the last byte.
        fetch.write(DATA[100_000:])
        await until(lambda: followed.written == len(DATA), what="all bytes written")
        await sleep(reactor, 0.2)
        assert followed.readable() == len(DATA) - 1 and not followed.verified
        a.held[0].release()
        await until(lambda: followed.state is State.COMMITTED, what="the commit to be seen")
        assert followed.readable() == len(DATA)
        with open(a.store.blob_path(DIGEST), "rb") as f:
            assert f.read() == DATA
        assert mine is fetch and not b.inflight.active(DIGEST)
    finally:
        a.inflight.stop()
        b.inflight.stop()


@pytest_twisted.ensureDeferred
async def test_a_blob_committed_while_a_replica_looked_is_not_fetched_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    # b missed the store just before a committed the blob and gave its lease back: b
    # must find it in the store, not take the free lease and fetch it a second time.
    a, b = await replicas(cluster, tmp_path)
    try:
        await a.inflight.join_or_start(DIGEST, a.start)
        a.fetches[0].write(DATA)
        a.held[0].release()
        await until(lambda: not a.inflight.active(DIGEST), what="a's fetch to end")
        coordinator = await cluster.coordinator()
        key = coordinator.key(f"fetch|{DIGEST}")
        deadline = time.monotonic() + 10
        while await coordinator.call("GET", key) is not None:
            assert time.monotonic() < deadline, "a's lease was not given back"
            await sleep(reactor, 0.02)
        got = await b.inflight.join_or_start(DIGEST, b.start)
        assert not b.fetches  # nothing fetched by b
        assert got.state is State.COMMITTED and got.readable() == len(DATA)
        fd = got.open_reader()
        try:
            assert os.read(fd, len(DATA) + 1) == DATA
        finally:
            os.close(fd)
    finally:
        a.inflight.stop()
        b.inflight.stop()


class _HoldHash:
    """Writer events passed on, but the digest's verdict only on ``release``."""

    def __init__(self, events: Any) -> None:
        self._events = events
        self._pending: list[tuple[int, str]] = []

    def on_progress(self, written: int, hashed: int) -> None:
        self._events.on_progress(written, hashed)

    def on_hashed(self, total: int, hexdigest: str) -> None:
        self._pending.append((total, hexdigest))

    def on_synced(self) -> None:
        self._events.on_synced()

    def on_write_failed(self, error: BaseException) -> None:
        self._events.on_write_failed(error)

    def release(self) -> None:
        for total, hexdigest in self._pending:
            self._events.on_hashed(total, hexdigest)


@pytest_twisted.ensureDeferred
async def test_followers_of_a_replica_that_died_are_cut_and_the_next_request_fetches(
    cluster: Cluster, tmp_path: Path
) -> None:
    a, b = await replicas(cluster, tmp_path, lease=1.0)
    try:
        await a.inflight.join_or_start(DIGEST, a.start)
        followed = await b.inflight.join_or_start(DIGEST, b.start)
        assert isinstance(followed, RemoteFetch)
        a.fetches[0].write(DATA[:1000])
        # a "dies": no more renewals, no more bytes.
        a.inflight.stop()
        for lease in a.leases:
            lease._renewal.stop()  # type: ignore[attr-defined]
        await until(lambda: followed.failed, timeout=10, what="the follower to give up")
        assert followed.readable() == 0  # readers abort, nothing more is sent
        again = await b.inflight.join_or_start(DIGEST, b.start)
        assert again is b.fetches[0]  # b took the lease: the second fetch
    finally:
        a.inflight.stop()
        b.inflight.stop()


@pytest_twisted.ensureDeferred
async def test_readers_are_registered_while_they_read(cluster: Cluster, tmp_path: Path) -> None:
    a, _ = await replicas(cluster, tmp_path)
    coordinator = cluster.coordinators[0]
    key = coordinator.key(f"readers|{DIGEST}")
    try:
        release = a.inflight.reading(DIGEST)
        await sleep(reactor, 0.1)
        assert await coordinator.call("ZRANGE", key, 0, -1) == ["a"]
        release()
        await sleep(reactor, 0.1)
        assert await coordinator.call("ZRANGE", key, 0, -1) == []
    finally:
        a.inflight.stop()


# -- the reaper ----------------------------------------------------------------------


def _reaper(
    coordinator: Coordinator, store: Store, usage: ClusterUsage, name: str, lease: float
) -> ClusterReaper:
    return ClusterReaper(
        reactor,
        coordinator,
        store,
        usage,
        name,
        run_in_thread=lambda f, *a: succeed(f(*a)),
        in_use=lambda d: False,
        on_removed=lambda k, d: None,
        ttl=60,
        interval=0,
        lease=lease,
    )


async def _expired_blob(store: Store, usage: ClusterUsage) -> Digest:
    temp = store.new_temp()
    os.write(temp.fd, DATA)
    os.close(temp.fd)
    store.commit(temp.path, DIGEST)
    usage.added(Kind.BLOB, DIGEST, len(DATA))
    await usage.flush()
    await usage._coord.call("ZADD", usage._coord.key("lastuse"), time.time() - 3600, str(DIGEST))
    return DIGEST


@pytest_twisted.ensureDeferred
async def test_a_paused_leader_cannot_delete_what_the_new_leader_saw_used(
    cluster: Cluster, tmp_path: Path
) -> None:
    store = Store(tmp_path)
    store.prepare()
    ca, cb = await cluster.coordinator(), await cluster.coordinator()
    usage_a, usage_b = ClusterUsage(reactor, ca), ClusterUsage(reactor, cb)
    old = _reaper(ca, store, usage_a, "a", lease=0.5)
    new = _reaper(cb, store, usage_b, "b", lease=30)
    digest = await _expired_blob(store, usage_a)
    assert await old.lead()
    plan = await old.due_expired()
    assert plan == [[digest]]  # expired, as the leader saw it... then it paused
    await sleep(reactor, 0.7)  # past its lease
    assert await new.lead()
    usage_b.used(digest)  # the new leader's replica serves it
    await usage_b.flush()
    with pytest.raises(Fenced):
        await old.delete_batch(plan[0], "expired")  # the old leader wakes up
    assert store.blob_size(digest) == len(DATA)  # fenced: nothing deleted
    assert old.leader is None and old.stats["expired"] == 0
    assert await cb.call("HEXISTS", cb.key("entries"), str(digest)) == 1
    assert await new.due_expired() == []  # and the new leader sees it alive


@pytest_twisted.ensureDeferred
async def test_the_leader_leaves_alone_what_a_replica_reads(
    cluster: Cluster, tmp_path: Path
) -> None:
    store = Store(tmp_path, "a")
    store.prepare()
    coordinator = await cluster.coordinator()
    usage = ClusterUsage(reactor, coordinator)
    reaper = _reaper(coordinator, store, usage, "a", lease=30)
    reader = RedisInFlight(reactor, coordinator, store, "b", LocalInFlight(), heartbeat=0.2)
    digest = await _expired_blob(store, usage)
    release = reader.reading(digest)
    await sleep(reactor, 0.1)
    assert await reaper.lead()
    for batch in await reaper.due_expired():
        await reaper.delete_batch(batch, "expired")
    assert store.blob_size(digest) == len(DATA)  # read: kept
    release()
    await sleep(reactor, 0.1)
    for batch in await reaper.due_expired():
        await reaper.delete_batch(batch, "expired")
    assert store.blob_size(digest) is None and reaper.stats["expired"] == 1
