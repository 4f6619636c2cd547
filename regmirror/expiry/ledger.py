"""The ledger: what the store holds, in memory, and what the mirror tells the expiry
layer (it implements ``regmirror.expiry.usage.Usage``).

Every verified blob and manifest is an ``Entry`` (kind, size, last use; for a manifest,
the digests it references). Beside the entries: their least-recently-used order (for
eviction), a heap of (deadline, digest) (for expiry: popped lazily, an entry used since
it was pushed is pushed again with its new deadline), who references what, the bytes
committed and reserved by fetches in flight, and what changed since the state was last
saved. The ledger decides nothing and touches no file: the reaper
(``regmirror.expiry.reaper``) reads it, removes from it and deletes.

The ledger is built first and given to the mirror; the reaper, built after the mirror,
subscribes to the ledger's eviction requests in its constructor (``on_evict``).
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.reactor import ReactorTime
from regmirror.storage.store import Stored


@attrs.define
class Entry:
    kind: Kind
    size: int
    last_used: float
    refs: tuple[Digest, ...] = ()


class Ledger:
    """Entries of one store. ``clock`` is the reactor's time (an eviction that ``added``
    asks for runs one turn later); ``wall_clock`` gives the last-use times,
    which survive restarts."""

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
        self.entries: dict[Digest, Entry] = {}
        self.usage = 0  # bytes committed
        self._lru: OrderedDict[Digest, None] = OrderedDict()
        self._heap: list[tuple[float, Digest]] = []
        self._referrers: dict[Digest, set[Digest]] = {}
        self._reserved: dict[Digest, int] = {}
        self._changes: dict[Digest, Entry | None] = {}
        self._evictors: list[Callable[[], object]] = []

    # -- Usage: what the mirror tells us ---------------------------------------------

    def added(self, kind: Kind, digest: Digest, size: int, refs: tuple[Digest, ...] = ()) -> None:
        if digest in self.entries:
            self.used(digest)
            return
        entry = Entry(kind, size, self._now(), refs)
        self._insert(digest, entry)
        self._changes[digest] = entry
        if self.over_quota:
            self._clock.callLater(0, self.evict)

    def used(self, digest: Digest) -> None:
        entry = self.entries.get(digest)
        if entry is None:
            return
        entry.last_used = self._now()
        self._lru.move_to_end(digest)
        self._changes[digest] = entry
        for ref in entry.refs:  # using a manifest keeps what it references alive
            child = self.entries.get(ref)
            if child is not None and child.kind == Kind.MANIFEST:
                child.last_used = entry.last_used
                self._lru.move_to_end(ref)
                self._changes[ref] = child

    def reserve(self, digest: Digest, size: int) -> bool:
        """Count a fetch in flight; False when it cannot fit even after eviction (then
        it is passed through, not cached)."""
        if self.max_size and size > self.low:
            return False
        self._reserved[digest] = size
        if self.over_quota:
            self.evict()
        return True

    def release(self, digest: Digest) -> None:
        self._reserved.pop(digest, None)

    def evict(self) -> list[object]:
        """Ask whoever subscribed (the reaper) to make room now."""
        return [evict() for evict in self._evictors]

    # -- what the reaper reads and changes -------------------------------------------

    def on_evict(self, evict: Callable[[], object]) -> None:
        """Call ``evict()`` whenever room must be made (above the high watermark, or a
        full disk)."""
        self._evictors.append(evict)

    def now(self) -> float:
        """The wall-clock time that last uses are measured in."""
        return self._now()

    @property
    def reserved(self) -> int:
        return sum(self._reserved.values())

    @property
    def over_quota(self) -> bool:
        return bool(self.max_size) and self.usage + self.reserved > self.high

    def referenced(self, digest: Digest) -> bool:
        return bool(self._referrers.get(digest))

    def lru(self) -> list[Digest]:
        """Every entry, least recently used first."""
        return list(self._lru)

    def due(self, now: float) -> Iterator[Digest | None]:
        """Pop the deadlines up to ``now``: yields each digest whose entry expired, and
        None for a deadline that was stale (the entry is gone, or was used since and is
        pushed again with its new deadline)."""
        while self._heap and self._heap[0][0] <= now:
            _, digest = heapq.heappop(self._heap)
            entry = self.entries.get(digest)
            if entry is None:
                yield None
                continue
            current = entry.last_used + self.ttl
            if current > now:
                heapq.heappush(self._heap, (current, digest))
                yield None
            else:
                yield digest

    def postpone(self, digest: Digest, deadline: float) -> None:
        """Look at an expired entry again at ``deadline`` (it is being read)."""
        heapq.heappush(self._heap, (deadline, digest))

    def drop(self, digest: Digest) -> Entry | None:
        entry = self.entries.pop(digest, None)
        if entry is None:
            return None
        self._lru.pop(digest, None)
        self.usage -= entry.size
        for ref in entry.refs:
            referrers = self._referrers.get(ref)
            if referrers is not None:
                referrers.discard(digest)
                if not referrers:
                    del self._referrers[ref]
        self._changes[digest] = None
        return entry

    def settle(self, saved: Mapping[Digest, Entry] | None, found: Iterable[Stored]) -> int:
        """Start from the saved state and what a scan of the store found: entries whose
        files are gone are dropped, files without an entry (or with a different one) are
        adopted with their mtime as last use; what was recorded meanwhile wins. Returns
        the number of entries dropped."""
        saved = saved or {}
        merged: dict[Digest, Entry] = {}
        for stored in found:
            entry = saved.get(stored.digest)
            if entry is None or entry.size != stored.size or entry.kind != stored.kind:
                entry = Entry(stored.kind, stored.size, stored.mtime, stored.refs)
                self._changes[stored.digest] = entry
            merged[stored.digest] = entry
        dropped = 0
        for digest in saved:
            if digest not in merged:
                dropped += 1
                self._changes[digest] = None
        # Whatever happened while we were loading is newer than the files.
        merged.update(self.entries)
        self.entries = {}
        self._lru.clear()
        self._heap.clear()
        self._referrers.clear()
        self.usage = 0
        for digest, entry in sorted(merged.items(), key=lambda item: item[1].last_used):
            self._insert(digest, entry)
        return dropped

    def take_changes(self) -> dict[Digest, Entry | None]:
        """What changed since the last call (None: removed), to be saved."""
        changes, self._changes = self._changes, {}
        return changes

    def unsaved(self, changes: dict[Digest, Entry | None]) -> None:
        """Saving ``changes`` failed: keep them for the next save (newer ones win)."""
        changes.update(self._changes)
        self._changes = changes

    def _insert(self, digest: Digest, entry: Entry) -> None:
        self.entries[digest] = entry
        self._lru[digest] = None
        self._lru.move_to_end(digest)
        self.usage += entry.size
        for ref in entry.refs:
            self._referrers.setdefault(ref, set()).add(digest)
        if self.ttl > 0:
            heapq.heappush(self._heap, (entry.last_used + self.ttl, digest))
