"""``InFlight`` for a cluster: one upstream fetch per blob across every replica.

For each digest fetched, one replica holds a lease in Redis, ``<name>:fetch|<digest>``
(``SET NX PX``, ``lease`` seconds, renewed every third of it while the fetch runs, from
the moment it is taken: the wait for the upstream's headers counts). It downloads as one
process does (``BlobFetch``, its temporary file under ``ROOT/_tmp/<replica>/``) and
publishes the fetch's progress: ``<name>:fetchinfo|<digest>`` holds the holder, the
temporary file and the last report (state, bytes written, bytes hashed, size), and each
report is also published on the channel ``<name>:progress|<digest>``; reports are sent
at most every ``redislease.REPORT_EVERY`` seconds, and at once when the fetch is verified,
committed or failed.

Another replica asked for that digest finds the lease taken and follows the fetch
(``regmirror.fetch.remote.RemoteFetch``): its clients read the holder's temporary file
on the shared store as it grows, never the last byte before the holder reported the
digest verified or the verified file appeared in the store. A replica whose lease is
still being started (no report yet) is waited for.

A holder that dies stops renewing: its lease expires. Its followers see the lease gone
while the temporary file stopped growing: the fetch failed, their clients' transfers are
cut (never completed with unverified bytes), and the next request for the digest takes
the lease and fetches again. A Redis that restarted empty is not a death: holders
re-take their leases at the next renewal, and followers wait for the file to stop
growing before they give up on a holder.

Readers are registered too, for the cluster's reaper (``regmirror.expiry.cluster``):
``<name>:readers|<digest>`` is a sorted set of the replicas reading it, each with an
expiry (Redis's own clock), renewed by a heartbeat every ``heartbeat`` seconds and
removed when the last local reader is done. The same heartbeat keeps
``<name>:replica|<replica>`` alive: whose temporary files are still being written.

Redis unreachable: fetches are started as one process would (``LocalInFlight``:
single flight within this replica only), followers watch the files, and everything is
registered again when Redis is back.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from regmirror.coord.redis import Coordinator, CoordinatorDown, sleep
from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import BlobFetch, FetchView, State
from regmirror.fetch.inflight import (
    FailureReason,
    FetchLease,
    FetchProgress,
    LocalInFlight,
    Release,
    StartFetch,
)
from regmirror.fetch.redislease import REGISTER, RELEASE, RedisLease, parse_info
from regmirror.fetch.remote import Progress, RemoteFetch
from regmirror.fetch.singleflight import SingleFlight
from regmirror.logs import get_logger
from regmirror.storage.store import Store

log = get_logger()

WAIT = 0.02  # seconds between looks while another replica starts a fetch


class _Taken(Exception):
    """Another replica took the lease first: follow its fetch."""


class RedisInFlight:
    """``InFlight`` across the replicas that share ``coordinator`` and ``store``;
    ``replica`` names this one, ``local`` is its own ``LocalInFlight`` (fetch slots,
    fetches run here, readers, failure counts)."""

    def __init__(
        self,
        clock: Any,
        coordinator: Coordinator,
        store: Store,
        replica: str,
        local: LocalInFlight,
        *,
        lease: float = 15.0,
        poll: float = 0.5,
        heartbeat: float = 5.0,
        stall: float = 60.0,
    ) -> None:
        self._clock = clock
        self._coord = coordinator
        self._store = store
        self._replica = replica
        self._local = local
        self.lease = lease
        self._poll = poll
        self._heartbeat = heartbeat
        self._stall = stall
        self._joining: SingleFlight[FetchView] = SingleFlight()
        self._remote: dict[Digest, RemoteFetch] = {}
        self._channels: dict[Digest, Callable[[str], None]] = {}
        self._readers: Counter[Digest] = Counter()
        self._leases: dict[Digest, RedisLease] = {}
        self._watch = LoopingCall(self._look_all)
        self._watch.clock = clock
        self._beat = LoopingCall(self._register_all)
        self._beat.clock = clock
        coordinator.on_change(self._connection_changed)

    # -- lifecycle (RedisInFlightService starts and stops these) ---------------------

    def start(self) -> None:
        self._watch.start(self._poll, now=False).addErrback(
            lambda f: log.failure("cluster: the watch of remote fetches stopped", f)
        )
        self._beat.start(self._heartbeat, now=False).addErrback(
            lambda f: log.failure("cluster: the readers' heartbeat stopped", f)
        )

    def stop(self) -> None:
        for loop in (self._watch, self._beat):
            if loop.running:
                loop.stop()

    def _key(self, kind: str, digest: Digest) -> str:
        return self._coord.key(f"{kind}|{digest}")

    # -- InFlight --------------------------------------------------------------------

    def fetch(self, digest: Digest) -> FetchView | None:
        return self._local.fetch(digest) or self._remote.get(digest)

    def active(self, digest: Digest) -> bool:
        return self._local.active(digest) or digest in self._remote or digest in self._joining

    async def join_or_start(self, digest: Digest, start: StartFetch) -> FetchView:
        fetch = self.fetch(digest)
        if fetch is not None and not fetch.failed:
            return fetch
        return await self._joining.run(digest, lambda: self._join(digest, start))

    def reading(self, digest: Digest) -> Release:
        release_local = self._local.reading(digest)
        self._readers[digest] += 1
        if self._readers[digest] == 1:
            self._register([digest])
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            release_local()
            self._readers[digest] -= 1
            if self._readers[digest] <= 0:
                del self._readers[digest]
                self._coord.send("ZREM", self._key("readers", digest), self._replica)

        return release

    def in_use(self, digest: Digest) -> bool:
        return self._local.in_use(digest) or digest in self._remote

    def failures(self) -> Mapping[FailureReason, int]:
        return self._local.failures()

    def count(self) -> int:
        return self._local.count()

    def readers(self) -> int:
        return self._local.readers()

    def fetches(self) -> list[FetchProgress]:
        remote = [
            FetchProgress(d, f.received, f.size, self._readers.get(d, 0))
            for d, f in self._remote.items()
        ]
        return self._local.fetches() + remote

    def followed(self) -> int:
        """Fetches of other replicas followed here now."""
        return len(self._remote)

    # -- joining or starting ---------------------------------------------------------

    async def _join(self, digest: Digest, start: StartFetch) -> FetchView:
        deadline = self._clock.seconds() + 2 * self.lease
        while True:
            if not self._coord.connected:
                return await self._local.join_or_start(digest, start)
            try:
                held, info = await self._coord.call(
                    "MGET", self._key("fetch", digest), self._key("fetchinfo", digest)
                )
            except CoordinatorDown:
                return await self._local.join_or_start(digest, start)
            if held is None:
                committed = self._committed(digest)
                if committed is not None:
                    return committed
                try:
                    return await self._local.join_or_start(
                        digest, lambda lease: self._start_here(digest, start, lease)
                    )
                except _Taken:
                    continue
            holder = held.split(" ", 1)[0]
            if holder == self._replica and digest not in self._leases:
                # Left by an earlier run of this replica (killed): not running any more.
                await self._coord.eval(RELEASE, [self._key("fetch", digest)], [held])
                continue
            followed = self._follow(digest, holder, info)
            if followed is not None:
                return followed
            if self._clock.seconds() > deadline:
                log.warn(
                    "cluster: replica {holder} holds {digest} but did not start it; "
                    "fetching it here",
                    holder=holder,
                    digest=str(digest),
                )
                return await self._local.join_or_start(digest, start)
            await sleep(self._clock, WAIT)  # the holder waits for the upstream's headers

    def _committed(self, digest: Digest) -> RemoteFetch | None:
        """The blob committed by a replica whose lease this one just saw given back
        (after the rename: the store shows it), although it was not in the store when
        this one looked: served from the store, not fetched again."""
        size = self._store.blob_size(digest)
        if size is None:
            return None
        done = Progress(State.COMMITTED, size, size, size)
        return RemoteFetch(self._store, digest, "", self._store.blob_path(digest), done)

    async def _start_here(self, digest: Digest, start: StartFetch, local: FetchLease) -> BlobFetch:
        value = f"{self._replica} {secrets.token_hex(8)}"
        try:
            taken = await self._coord.call(
                "SET", self._key("fetch", digest), value, "NX", "PX", int(self.lease * 1000)
            )
        except CoordinatorDown:
            return await start(local)  # alone: as one process does
        if taken is None:
            raise _Taken()
        lease = RedisLease(self, digest, value, local)
        self._leases[digest] = lease
        try:
            return await start(lease)
        except BaseException:
            lease.abandon()
            raise

    def _follow(self, digest: Digest, holder: str, info: str | None) -> RemoteFetch | None:
        """The fetch ``holder`` runs, if it reported one (else None: wait for it)."""
        parsed = parse_info(info)
        if parsed is None or parsed[0] != holder:
            return None
        _, relative, progress = parsed
        if progress.state is State.FAILED:
            return None  # its lease goes next
        fetch = RemoteFetch(self._store, digest, holder, self._store.root / relative, progress)
        fetch.moved = self._clock.seconds()
        if fetch.done:
            return fetch
        self._remote[digest] = fetch
        on_message = lambda text: self._reported(fetch, text)  # noqa: E731
        self._channels[digest] = on_message
        self._coord.subscribe(self._key("progress", digest), on_message)
        log.info(
            "blob {digest} is being fetched by replica {holder}: following it",
            digest=str(digest),
            holder=holder,
        )
        return fetch

    def _reported(self, fetch: RemoteFetch, text: str) -> None:
        try:
            progress = Progress.decode(text)
        except (ValueError, KeyError):
            log.warn("cluster: unreadable progress report {text!r}", text=text)
            return
        fetch.update(progress, self._clock.seconds())
        self._settle(fetch)

    def _settle(self, fetch: RemoteFetch) -> None:
        """A remote fetch that ended is no longer followed (its readers keep it)."""
        if fetch.done and self._remote.get(fetch.digest) is fetch:
            del self._remote[fetch.digest]
            on_message = self._channels.pop(fetch.digest, None)
            if on_message is not None:
                self._coord.unsubscribe(self._key("progress", fetch.digest), on_message)

    # -- the periodic look at remote fetches -----------------------------------------

    def _look_all(self) -> Deferred[None] | None:
        if not self._remote:
            return None
        d = Deferred.fromCoroutine(self._look(list(self._remote.values())))
        d.addErrback(lambda f: log.failure("cluster: looking at remote fetches failed", f))
        return d

    async def _look(self, fetches: list[RemoteFetch]) -> None:
        now = self._clock.seconds()
        for fetch in fetches:
            fetch.look_on_disk(now)
        if self._coord.connected:
            keys = [
                k
                for f in fetches
                for k in (self._key("fetch", f.digest), self._key("fetchinfo", f.digest))
            ]
            try:
                values = await self._coord.call("MGET", *keys)
            except CoordinatorDown:
                values = None
            if values is not None:
                for i, fetch in enumerate(fetches):
                    held, info = values[2 * i], values[2 * i + 1]
                    parsed = parse_info(info)
                    if parsed is not None and parsed[0] == fetch.holder:
                        fetch.update(parsed[2], now)
                    alive = held is not None and held.split(" ", 1)[0] == fetch.holder
                    if not alive and now - fetch.moved > self.lease / 3 + 2 * self._poll:
                        fetch.holder_gone()
        for fetch in fetches:
            if not fetch.done and now - fetch.moved > self._stall:
                fetch.fail(
                    TimeoutError(f"no progress from replica {fetch.holder} in {self._stall:g}s")
                )
            self._settle(fetch)

    # -- readers and the heartbeat ---------------------------------------------------

    def _register(self, digests: list[Digest]) -> None:
        keys = [self._key("readers", d) for d in digests]
        self._coord.send_eval(REGISTER, keys, [self._replica, int(3 * self._heartbeat * 1000)])

    def _register_all(self) -> None:
        if not self._coord.connected:
            return
        self._coord.send(
            "SET",
            self._coord.key(f"replica|{self._replica}"),
            "1",
            "PX",
            int(3 * self._heartbeat * 1000),
        )
        if self._readers:
            self._register(list(self._readers))

    def _connection_changed(self, connected: bool) -> None:
        if connected:
            self._register_all()
            for lease in list(self._leases.values()):
                lease.renew()
