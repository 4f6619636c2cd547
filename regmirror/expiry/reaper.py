"""The reaper: expiry by time since last use, a disk quota, and the state that survives
restarts.

A ``LoopingCall`` ticks every interval: it pops the ledger's deadlines that are due,
removes expired manifests (the store drops the tags that resolve to them and the
repository links) and the blobs that expired or that no live manifest references any
more; above the quota's high watermark it evicts least recently used content until
usage is under the low one; then it saves what changed. Nothing being read or written
(``in_use``) is removed, and whoever holds a copy in memory is told (``on_removed``).
File deletions run in a thread, in batches; the in-memory work runs in slices, so a
sweep of 100,000 entries never holds the reactor for more than a few milliseconds at a
time.

At start-up the saved state (``regmirror.expiry.state``) is settled against a scan of
the store (both in a thread): entries whose files are gone are dropped, files without an
entry are adopted with their mtime as last use. Missing or corrupt state is rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.expiry.ledger import Entry, Ledger
from regmirror.expiry.state import StateDB
from regmirror.logs import get_logger
from regmirror.reactor import ReactorTime
from regmirror.storage.store import Store, Stored

log = get_logger()

SLICE = 500  # entries handled per reactor turn
BATCH = 1000  # files deleted per call in a thread

RunInThread = Callable[..., "Deferred[Any]"]


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
        self._ticking = False
        self.stats = {"expired": 0, "evicted": 0, "freed": 0}
        # ``self.evict`` looked up at each request: replacing it replaces what is called.
        ledger.on_evict(lambda: self.evict())

    # -- what the pages read (regmirror.expiry.view) ----------------------------------

    @property
    def entries(self) -> dict[Digest, Entry]:
        return self.ledger.entries

    @property
    def entry_count(self) -> int:
        return len(self.ledger.entries)

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
        d = self.load()
        d.addCallback(lambda _: self._start_loop())
        d.addErrback(lambda f: log.failure("the reaper could not start", f))

    def _start_loop(self) -> None:
        if self.interval > 0 and self.running:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = cast(IReactorTime, self._clock)  # the same, as a zope type
            self._loop.start(self.interval, now=True).addErrback(
                lambda f: log.failure("the reaper stopped", f)
            )

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self.flush())

    def load(self) -> Deferred[None]:
        """Read the saved state and settle it against the store (both in a thread)."""

        def work() -> tuple[dict[Digest, Entry] | None, list[Stored]]:
            return self._db.load(), self._store.scan()

        d = self._run(work)
        d.addCallback(lambda result: self._loaded(*result))
        return d

    def _loaded(self, saved: dict[Digest, Entry] | None, found: list[Stored]) -> None:
        if saved is None and found:
            log.warn(
                "no usable reaper state: rebuilt from a scan of the store ({count} entries)",
                count=len(found),
            )
        dropped = self.ledger.settle(saved, found)
        if dropped:
            log.info("dropped {count} entries whose files are gone", count=dropped)
        self.ready = True
        log.info(
            "reaper: {count} entries, {usage} bytes in the store",
            count=len(self.ledger.entries),
            usage=self.ledger.usage,
        )

    # -- the periodic work -----------------------------------------------------------

    def tick(self) -> Deferred[None] | None:
        """Expire what is due, evict above the quota, save what changed. Never raises:
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
        await self._expire()
        await self._evict()
        await self.flush()

    def evict(self) -> Deferred[None] | None:
        """Make room now (above the quota, or a full disk); never raises."""
        if not self.ready:
            return None
        d = Deferred.fromCoroutine(self._evict())
        d.addErrback(lambda f: log.failure("eviction failed", f))
        return d

    async def _expire(self) -> None:
        ledger = self.ledger
        if ledger.ttl <= 0:
            return
        now = ledger.now()
        due: list[Digest] = []
        for handled, digest in enumerate(ledger.due(now), 1):
            if digest is not None:
                if self._in_use(digest):
                    ledger.postpone(digest, now + self.interval)
                else:
                    due.append(digest)
            if handled % SLICE == 0:
                await self._yield()
        removed = self._remove(due, "expired")
        # Blobs that no live manifest references any more go with their manifests.
        orphans = [
            ref
            for digest, entry in removed
            if entry.kind == Kind.MANIFEST
            for ref in entry.refs
            if ref in ledger.entries and not ledger.referenced(ref) and not self._in_use(ref)
        ]
        self._remove(list(dict.fromkeys(orphans)), "expired")
        await self._delete([d for d, _ in removed] + orphans)

    async def _evict(self) -> None:
        ledger = self.ledger
        if not ledger.over_quota:
            return
        victims: list[Digest] = []
        projected = ledger.usage + ledger.reserved
        for count, digest in enumerate(ledger.lru()):
            if projected <= ledger.low:
                break
            if self._in_use(digest):
                continue
            victims.append(digest)
            projected -= ledger.entries[digest].size
            if count % SLICE == SLICE - 1:
                await self._yield()
        removed = self._remove(victims, "evicted")
        log.info(
            "quota: evicted {count} entries; {usage} bytes in use (high {high}, low {low})",
            count=len(removed),
            usage=ledger.usage,
            high=ledger.high,
            low=ledger.low,
        )
        await self._delete([d for d, _ in removed])

    def _remove(self, digests: list[Digest], why: str) -> list[tuple[Digest, Entry]]:
        removed = []
        for digest in digests:
            entry = self.ledger.drop(digest)
            if entry is None:
                continue
            removed.append((digest, entry))  # its files go, whatever the listener does
            self.stats[why] += 1
            try:
                self._on_removed(entry.kind, digest)
            except Exception:
                log.failure("forgetting {digest} failed", digest=str(digest))
        return removed

    async def _delete(self, digests: list[Digest]) -> None:
        if not digests:
            return
        for i in range(0, len(digests), BATCH):
            freed = await self._run(self._store.remove, digests[i : i + BATCH])
            self.stats["freed"] += freed
        log.info("reaper removed {count} files", count=len(digests))

    async def _yield(self) -> None:
        d: Deferred[None] = Deferred()
        self._clock.callLater(0, d.callback, None)
        await d

    async def flush(self) -> None:
        """Save what changed (in a thread); on failure, keep it for the next save."""
        changes = self.ledger.take_changes()
        if not changes:
            return
        try:
            await self._run(self._db.save, changes)
        except Exception:
            log.failure("cannot save the reaper state; will retry")
            self.ledger.unsaved(changes)
