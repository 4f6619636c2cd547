"""The ledger's front in memory: what the mirror tells the expiry layer (it implements
``regmirror.expiry.usage.Usage``), until the reaper writes it to the state database.

The entries themselves (kind, size, last use; for a manifest, the digests it
references) are rows of ``regmirror.expiry.state`` (SQLite, indexed by last use: the
expiry order and the least-recently-used order are the same order), so memory does not
grow with the store. What is here is only what changed since the last flush, kept in
O(1) per call on the mirror's hot path:

- ``touched``: digest -> last use, repeated uses coalesced into one;
- ``added``: entries committed since (a fetch, a manifest stored);
- ``dropped``: digests removed by a purge;

and the totals (entries, bytes) as the database had them at the last write, plus what
is pending, and the bytes reserved by fetches in flight (the quota counts them). The
reaper (``regmirror.expiry.reaper``) takes the pending changes (``take``), writes them
in a thread and tells the ledger how the totals moved (``flushed``); whatever it
removes goes through ``removed``. An entry with pending changes is never chosen for
removal (``pending``): it was used, added or purged since the database last heard.

The ledger is built first and given to the mirror; the reaper, built after the mirror,
subscribes to the ledger's eviction requests in its constructor (``on_evict``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.reactor import ReactorTime


@attrs.define
class Entry:
    kind: Kind
    size: int
    last_used: float
    refs: tuple[Digest, ...] = ()


@attrs.frozen
class Pending:
    """What the ledger recorded since the last flush (see the module's docstring)."""

    added: dict[Digest, Entry] = attrs.Factory(dict)
    touched: dict[Digest, float] = attrs.Factory(dict)
    dropped: set[Digest] = attrs.Factory(set)
    size: int = 0  # the bytes of ``added``

    def __bool__(self) -> bool:
        return bool(self.added or self.touched or self.dropped)


class Ledger:
    """What changed in one store since the state database last heard, and its totals.
    ``clock`` is the reactor's time (an eviction that ``added`` asks for runs one turn
    later); ``wall_clock`` gives the last-use times, which survive restarts."""

    def __init__(
        self,
        clock: ReactorTime,
        *,
        ttl: float,
        max_size: int = 0,
        high: float = 0.95,
        low: float = 0.85,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self.ttl = ttl
        self.max_size = max_size
        self.high = int(max_size * high)
        self.low = int(max_size * low)
        self._now = wall_clock
        self._added: dict[Digest, Entry] = {}
        self._touched: dict[Digest, float] = {}
        self._dropped: set[Digest] = set()
        self._added_size = 0
        self._flushing: Pending | None = None  # taken, being written
        self._db_entries = 0  # as the database had them at its last write
        self._db_usage = 0
        self._reserved: dict[Digest, int] = {}
        self._reserved_size = 0
        self._evictors: list[Callable[[], object]] = []

    # -- Usage: what the mirror tells us (every call O(1)) -----------------------------

    def added(self, kind: Kind, digest: Digest, size: int, refs: tuple[Digest, ...] = ()) -> None:
        old = self._added.get(digest)
        if old is not None:
            self._added_size -= old.size
        self._added[digest] = Entry(kind, size, self._now(), refs)
        self._added_size += size
        if self.over_quota:
            self._clock.callLater(0, self.evict)

    def used(self, digest: Digest) -> None:
        """Using a manifest also keeps the manifests it lists alive (when written)."""
        self._touched[digest] = self._now()

    def reserve(self, digest: Digest, size: int) -> bool:
        """Count a fetch in flight; False when it cannot fit even after eviction (then
        it is passed through, not cached)."""
        if self.max_size and size > self.low:
            return False
        self._reserved_size += size - self._reserved.get(digest, 0)
        self._reserved[digest] = size
        if self.over_quota:
            self.evict()
        return True

    def release(self, digest: Digest) -> None:
        self._reserved_size -= self._reserved.pop(digest, 0)

    def evict(self) -> list[object]:
        """Ask whoever subscribed (the reaper) to make room now."""
        return [evict() for evict in self._evictors]

    def drop(self, digest: Digest) -> Entry | None:
        """Forget ``digest`` (a purge: its files go too); returns its entry if it was
        added since the last flush."""
        self._dropped.add(digest)
        self._touched.pop(digest, None)
        entry = self._added.pop(digest, None)
        if entry is not None:
            self._added_size -= entry.size
        return entry

    # -- what the reaper and the pages read ---------------------------------------------

    def on_evict(self, evict: Callable[[], object]) -> None:
        """Call ``evict()`` whenever room must be made (above the high watermark, or a
        full disk)."""
        self._evictors.append(evict)

    def now(self) -> float:
        """The wall-clock time that last uses are measured in."""
        return self._now()

    @property
    def usage(self) -> int:
        """Bytes committed: the database's total and what is not written yet (an entry
        added again counts twice until then: the quota errs on the safe side)."""
        flushing = self._flushing.size if self._flushing is not None else 0
        return self._db_usage + flushing + self._added_size

    @property
    def entry_count(self) -> int:
        flushing = len(self._flushing.added) if self._flushing is not None else 0
        return self._db_entries + flushing + len(self._added)

    @property
    def reserved(self) -> int:
        return self._reserved_size

    @property
    def over_quota(self) -> bool:
        return bool(self.max_size) and self.usage + self._reserved_size > self.high

    def pending(self, digest: Digest) -> bool:
        """Whether ``digest`` changed since the database last heard (used, added,
        purged): not to be removed on what the database says of it."""
        if digest in self._touched or digest in self._added or digest in self._dropped:
            return True
        flushing = self._flushing
        return flushing is not None and (
            digest in flushing.touched or digest in flushing.added or digest in flushing.dropped
        )

    def overlay(self, digest: Digest, saved: Entry | None) -> Entry | None:
        """``saved`` (the database's entry) with what is pending applied (inspection)."""
        entry = saved
        for pending in (self._flushing, self.peek()):
            if pending is None:
                continue
            if digest in pending.dropped:
                entry = None
            if digest in pending.added:
                entry = attrs.evolve(pending.added[digest])
            last = pending.touched.get(digest)
            if entry is not None and last is not None:
                entry = attrs.evolve(entry, last_used=max(entry.last_used, last))
        return entry

    def peek(self) -> Pending:
        """What is pending, without taking it."""
        return Pending(self._added, self._touched, self._dropped, self._added_size)

    # -- the reaper writes what changed -------------------------------------------------

    def take(self) -> Pending:
        """What changed since the last call, to be written; ``flushed`` or
        ``unflushed`` must follow before the next ``take``."""
        pending = Pending(self._added, self._touched, self._dropped, self._added_size)
        self._added, self._touched, self._dropped, self._added_size = {}, {}, set(), 0
        self._flushing = pending
        return pending

    def flushed(self, entries: int, usage: int) -> None:
        """The changes taken were written: the database's totals moved by this much."""
        self._flushing = None
        self._db_entries += entries
        self._db_usage += usage

    def unflushed(self, pending: Pending) -> None:
        """Writing ``pending`` failed: keep it for the next write, under what was
        recorded since (newer wins)."""
        self._flushing = None
        added = {d: e for d, e in pending.added.items() if d not in self._dropped}
        added.update(self._added)
        touched = {d: t for d, t in pending.touched.items() if d not in self._dropped}
        for digest, last in self._touched.items():
            touched[digest] = max(last, touched.get(digest, last))
        self._added, self._touched = added, touched
        self._dropped = pending.dropped | self._dropped
        self._added_size = sum(e.size for e in added.values())

    def settled(self, entries: int, usage: int) -> None:
        """The database now holds what the store holds: its totals."""
        self._db_entries, self._db_usage = entries, usage

    def removed(self, sizes: Iterable[int]) -> None:
        """Entries of these sizes were deleted from the database."""
        for size in sizes:
            self._db_entries -= 1
            self._db_usage -= size
