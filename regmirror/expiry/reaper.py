"""The reaper: expiry by time since last use, a disk quota, and the state that survives
restarts.

The entries live in the state database (``regmirror.expiry.state``: SQLite, indexed by
last use), not in memory; the ledger (``regmirror.expiry.ledger``) holds only what
changed since the last write. A ``LoopingCall`` ticks every interval: it writes what the
ledger recorded (in a thread), then asks the database for the entries last used more
than ``ttl`` ago, ``SLICE`` at a time, and removes them (an expired manifest takes the
tags that resolve to it and the repository links; the blobs and manifests it references
that no live manifest references any more go with it); above the quota's high watermark
it evicts least recently used content until usage is under the low one. Nothing being
read or written (``in_use``) is removed, nor anything used, added or purged since the
database last heard (``Ledger.pending``); whoever holds a copy in memory is told
(``on_removed``). Every query, write and file deletion runs in a thread, in batches;
the reactor only filters each batch, so a sweep of a million entries never holds it for
long.

At start-up the state is settled against a walk of the store, all in a thread
(``StateDB.settle``), while the mirror already serves: entries whose files are gone are
dropped, files without an entry are adopted with their mtime as last use, and what the
mirror recorded meanwhile is written on top. Missing or corrupt state is rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.expiry.ledger import Entry, Ledger
from regmirror.expiry.state import Cancelled, Row, Settled, StateDB
from regmirror.logs import get_logger
from regmirror.reactor import ReactorTime
from regmirror.storage.store import Store

log = get_logger()

SLICE = 500  # entries handled per reactor turn
BATCH = 1000  # files deleted per call in a thread

RunInThread = Callable[..., "Deferred[Any]"]


class Entries(Mapping[Digest, Entry]):
    """The entries as the reaper knows them: the database's, with what the ledger has
    not written yet applied. For inspection and tests: each lookup reads the database
    on the calling thread."""

    def __init__(self, ledger: Ledger, db: StateDB) -> None:
        self._ledger = ledger
        self._db = db

    def __getitem__(self, digest: Digest) -> Entry:
        entry = self._ledger.overlay(digest, self._db.get(digest))
        if entry is None:
            raise KeyError(digest)
        return entry

    def __iter__(self) -> Iterator[Digest]:
        pending = self._ledger.peek()
        for digest in dict.fromkeys([*self._db.digests(), *pending.added]):
            if digest in self:
                yield digest

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, Digest):
            return False
        return self._ledger.overlay(digest, self._db.get(digest)) is not None


class Reaper(Service):
    """Expiry and quota for one store and its ledger. ``clock`` is the reactor's
    time; ``run_in_thread(f, *args)`` runs blocking work off the reactor
    thread and returns a Deferred (unit tests pass a synchronous one); ``in_use(digest)``
    says what is being read or written now; ``on_removed(kind, digest)`` is told of
    every entry removed."""

    def __init__(
        self,
        clock: ReactorTime,
        store: Store,
        ledger: Ledger,
        *,
        run_in_thread: RunInThread,
        in_use: Callable[[Digest], bool],
        on_removed: Callable[[Kind, Digest], None],
        interval: float = 60.0,
    ) -> None:
        self._clock = clock
        self._store = store
        self.ledger = ledger
        self._run = run_in_thread
        self._in_use = in_use
        self._on_removed = on_removed
        self.interval = interval
        self._db = StateDB(store.reaper_state)
        self.ready = False
        self._loop: LoopingCall | None = None
        self._retry: IDelayedCall | None = None
        self._ticking = False
        self._sweeps = DeferredLock()  # one expiry or eviction at a time
        self._evict_queued = False
        self._flush_lock = DeferredLock()  # one write of the ledger at a time
        self.stats = {"expired": 0, "evicted": 0, "freed": 0}
        # ``self.evict`` looked up at each request: replacing it replaces what is called.
        ledger.on_evict(lambda: self.evict())

    # -- what the pages read (regmirror.expiry.view) ----------------------------------

    @property
    def entries(self) -> Entries:
        return Entries(self.ledger, self._db)

    @property
    def entry_count(self) -> int:
        return self.ledger.entry_count

    @property
    def usage(self) -> int:
        return self.ledger.usage

    @property
    def max_size(self) -> int:
        return self.ledger.max_size

    @property
    def reserved(self) -> int:
        return self.ledger.reserved

    @property
    def high(self) -> int:
        return self.ledger.high

    @property
    def low(self) -> int:
        return self.ledger.low

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._start()

    def _start(self) -> None:
        def failed(f: Failure) -> None:
            if f.check(Cancelled):
                return  # stopping
            log.failure("the reaper could not load its state; trying again", f)
            if self.running:
                self._retry = self._clock.callLater(max(self.interval, 1.0), self._start)

        self._retry = None
        d = self.load()
        d.addCallback(lambda _: self._start_loop())
        d.addErrback(failed)

    def _start_loop(self) -> None:
        if self.interval > 0 and self.running:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = cast(IReactorTime, self._clock)  # the same, as a zope type
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: log.failure("the reaper stopped", f)
            )

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

        if not self.ready:  # still settling: the state stays as it was, settled next time
            self._db.cancel()
            return None

        async def stop() -> None:
            await self.flush()
            await self._run(self._db.close)

        return Deferred.fromCoroutine(stop())

    def load(self) -> Deferred[None]:
        """Settle the saved state against a walk of the store (in a thread); the
        mirror serves meanwhile, and what it records is written once this is done."""
        d = self._run(self._db.settle, self._store)
        d.addCallback(self._loaded)
        return d

    def _loaded(self, settled: Settled) -> None:
        if settled.rebuilt and settled.entries:
            log.warn(
                "no usable reaper state: rebuilt from a scan of the store ({count} entries)",
                count=settled.entries,
            )
        if settled.dropped:
            log.info("dropped {count} entries whose files are gone", count=settled.dropped)
        if settled.adopted and not settled.rebuilt:
            log.info("adopted {count} files without an entry", count=settled.adopted)
        self.ledger.settled(settled.entries, settled.usage)
        self.ready = True
        log.info(
            "reaper: settled: {count} entries, {usage} bytes in the store",
            count=settled.entries,
            usage=settled.usage,
        )
        if self.ledger.over_quota and self.interval <= 0:
            self.evict()  # else the first tick does, after what expired went

    # -- the periodic work -----------------------------------------------------------

    def tick(self) -> Deferred[None] | None:
        """Save what changed, expire what is due, evict above the quota. Never raises:
        a LoopingCall stops for good on its first exception."""
        if self._ticking or not self.ready:
            return None
        self._ticking = True
        d = Deferred.fromCoroutine(self._tick())

        def done(result: Any) -> None:
            self._ticking = False
            if hasattr(result, "getTraceback"):
                log.failure("reaper tick failed", result)

        d.addBoth(done)
        return d

    async def _tick(self) -> None:
        await self.flush()
        await self._sweeps.run(lambda: Deferred.fromCoroutine(self._expire()))
        await self._sweeps.run(lambda: Deferred.fromCoroutine(self._evict()))

    def evict(self) -> Deferred[None] | None:
        """Make room now (above the quota, or a full disk); never raises. A request
        while one waits to run joins it."""
        if not self.ready or self._evict_queued:
            return None
        self._evict_queued = True

        def run() -> Deferred[None]:
            self._evict_queued = False
            return Deferred.fromCoroutine(self._evict())

        d = self._sweeps.run(run)
        d.addErrback(lambda f: log.failure("eviction failed", f))
        return d

    def _removable(self, row: Row) -> bool:
        return not self.ledger.pending(row.digest) and not self._in_use(row.digest)

    async def _expire(self) -> None:
        ledger = self.ledger
        if ledger.ttl <= 0:
            return
        cutoff = ledger.now() - ledger.ttl
        after: tuple[float, int] | None = None
        victims: list[Row] = []
        while True:
            rows: list[Row] = await self._run(self._db.expired, cutoff, after, SLICE)
            if not rows:
                break
            after = rows[-1].at
            victims += [row for row in rows if self._removable(row)]
            if len(rows) < SLICE:
                break
            await self._yield()  # more to come: let the reactor have a turn
            if len(victims) >= BATCH:
                await self._remove_expired(victims)
                victims = []
        await self._remove_expired(victims)

    async def _remove_expired(self, rows: list[Row]) -> None:
        removed = await self._remove(rows, "expired")
        # What no live manifest references any more goes with the manifests.
        refs = [ref for row in removed if row.entry.kind == Kind.MANIFEST for ref in row.entry.refs]
        if refs:
            orphans: list[Row] = await self._run(self._db.unreferenced, refs)
            await self._remove([row for row in orphans if self._removable(row)], "expired")

    async def _evict(self) -> None:
        ledger = self.ledger
        if not ledger.over_quota:
            return
        await self.flush()  # what was added since is in the order too
        count = 0
        projected = ledger.usage + ledger.reserved
        after: tuple[float, int] | None = None
        victims: list[Row] = []
        while projected > ledger.low:
            rows: list[Row] = await self._run(self._db.oldest, after, SLICE)
            if not rows:
                break
            after = rows[-1].at
            for row in rows:
                if projected <= ledger.low:
                    break
                if self._removable(row):
                    victims.append(row)
                    projected -= row.entry.size
            if len(rows) < SLICE:
                break
            await self._yield()
            if len(victims) >= BATCH:
                count += len(await self._remove(victims, "evicted"))
                victims = []
        count += len(await self._remove(victims, "evicted"))
        log.info(
            "quota: evicted {count} entries; {usage} bytes in use (high {high}, low {low})",
            count=count,
            usage=ledger.usage,
            high=ledger.high,
            low=ledger.low,
        )

    async def _remove(self, rows: list[Row], why: str) -> list[Row]:
        """Tell the listener, then delete the entries and their files (in a thread);
        returns the entries that were still there."""
        if not rows:
            return []
        for row in rows:
            try:
                self._on_removed(row.entry.kind, row.digest)
            except Exception:
                log.failure("forgetting {digest} failed", digest=str(row.digest))
        digests = [row.digest for row in rows]
        removed: list[Row] = await self._run(self._db.remove, digests)
        self.ledger.removed(row.entry.size for row in removed)
        self.stats[why] += len(removed)
        # Its files go, whatever the listener or the database said.
        freed = await self._run(self._store.remove, digests)
        self.stats["freed"] += freed
        log.info("reaper removed {count} files", count=len(digests))
        return removed

    async def _yield(self) -> None:
        d: Deferred[None] = Deferred()
        self._clock.callLater(0, d.callback, None)
        await d

    async def flush(self) -> None:
        """Write what changed (in a thread); on failure, keep it for the next write.
        Nothing is written before the state is settled (the settling writes it then)."""
        if not self.ready:
            return
        await self._flush_lock.acquire()
        try:
            pending = self.ledger.take()
            if not pending:
                self.ledger.flushed(0, 0)
                return
            try:
                delta = await self._run(self._db.flush, pending)
            except Exception:
                log.failure("cannot save the reaper state; will retry")
                self.ledger.unflushed(pending)
                return
            self.ledger.flushed(delta.entries, delta.usage)
        finally:
            self._flush_lock.release()
