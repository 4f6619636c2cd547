"""The reaper: expiry by time since last use, a disk quota, and the state that survives
restarts.

Every verified blob and manifest in the store is an ``Entry`` (kind, size, last use;
for manifests, the digests they reference). A heap of (deadline, digest) drives expiry:
a ``LoopingCall`` pops what is due (re-pushing entries that were used since, whose
deadline moved), removes expired manifests with the tags that point at them, and blobs
that expired or that no live manifest references any more. Above the quota's high
watermark, least recently used content is evicted until usage is under the low one.
Nothing being read or written is removed. File deletions run in a thread, in batches;
the in-memory work runs in slices, so a sweep of 100,000 entries never holds the
reactor for more than a few milliseconds at a time.

State lives in SQLite (``ROOT/_state/reaper.sqlite3``, standard library, WAL): entries
are flushed incrementally (only what changed) at every tick and at shutdown, from a
thread. Missing or corrupt state, and any difference between the state and the files,
is settled at start-up by a scan of the store (in a thread): entries whose files are
gone are dropped, files without an entry are adopted with their mtime as last use.
"""

from __future__ import annotations

import heapq
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from regmirror.domain.digest import Digest
from regmirror.logs import get_logger
from regmirror.storage.store import Store

log = get_logger()

SLICE = 500  # entries handled per reactor turn
BLOB, MANIFEST = "blob", "manifest"

RunInThread = Callable[..., "Deferred[Any]"]
Found = tuple[str, int, float, tuple[str, ...]]  # kind, size, mtime, references


@attrs.define
class Entry:
    kind: str
    size: int
    last_used: float
    refs: tuple[str, ...] = ()


def manifest_references(data: bytes) -> tuple[str, ...]:
    """The digests a manifest references: config and layers, or an index's manifests."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return ()
    if not isinstance(parsed, dict):
        return ()
    found: list[str] = []
    config = parsed.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        found.append(config["digest"])
    for key in ("layers", "manifests", "blobs"):
        items = parsed.get(key)
        if isinstance(items, list):
            found.extend(
                i["digest"]
                for i in items
                if isinstance(i, dict) and isinstance(i.get("digest"), str)
            )
    valid = []
    for digest in found:
        try:
            valid.append(str(Digest.parse(digest)))
        except Exception:
            continue
    return tuple(dict.fromkeys(valid))


class StateDB:
    """Entries in SQLite. Every method runs in a thread (one at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS entries (digest TEXT PRIMARY KEY, kind TEXT NOT NULL,"
            " size INTEGER NOT NULL, last_used REAL NOT NULL, refs TEXT NOT NULL)"
        )
        return db

    def load(self) -> dict[str, Entry] | None:
        """The saved entries, or None when there is no usable state."""
        if not self.path.exists():
            return None
        try:
            db = self._connect()
            try:
                rows = db.execute("SELECT digest, kind, size, last_used, refs FROM entries")
                return {
                    digest: Entry(kind, int(size), float(last_used), tuple(json.loads(refs)))
                    for digest, kind, size, last_used, refs in rows
                }
            finally:
                db.close()
        except (sqlite3.Error, ValueError, TypeError) as e:
            log.warn(
                "reaper state {path} is unusable ({error}); rebuilding it",
                path=str(self.path),
                error=e,
            )
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(f"{self.path}{suffix}")
                except FileNotFoundError:
                    pass
            return None

    def save(self, changes: dict[str, Entry | None]) -> None:
        db = self._connect()
        try:
            with db:
                db.executemany(
                    "DELETE FROM entries WHERE digest = ?",
                    [(d,) for d, e in changes.items() if e is None],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                    [
                        (d, e.kind, e.size, e.last_used, json.dumps(e.refs))
                        for d, e in changes.items()
                        if e is not None
                    ],
                )
        finally:
            db.close()


def scan_store(store: Store) -> dict[str, Found]:
    """What is really in the store (a directory walk: call it in a thread)."""
    found: dict[str, Found] = {}
    for algorithm_dir in _dirs(store.blobs):
        for prefix_dir in _dirs(algorithm_dir):
            for entry in os.scandir(prefix_dir):
                if "." in entry.name or not entry.is_file():
                    continue
                digest = f"{os.path.basename(algorithm_dir)}:{entry.name}"
                stat = entry.stat()
                type_path = entry.path + ".type"
                if os.path.exists(type_path):
                    try:
                        with open(entry.path, "rb") as f:
                            refs = manifest_references(f.read())
                    except OSError:
                        refs = ()
                    found[digest] = (MANIFEST, stat.st_size, stat.st_mtime, refs)
                else:
                    found[digest] = (BLOB, stat.st_size, stat.st_mtime, ())
    return found


def _dirs(path: Path | str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir()]
    except FileNotFoundError:
        return []


def remove_files(store: Store, digests: Iterable[str]) -> int:
    """Delete content files and the tag links that point at removed manifests (in a
    thread). Returns the bytes freed."""
    freed = 0
    gone = set(digests)
    for text in gone:
        path = store.blob_path(Digest.parse(text))
        try:
            freed += path.stat().st_size
        except FileNotFoundError:
            pass
        store.discard(path)
        store.discard(path.with_name(path.name + ".type"))
    if gone:
        _unlink_references(store, gone)
    return freed


def _unlink_references(store: Store, gone: set[str]) -> None:
    """Tags that resolve to a removed manifest, and repository links to removed content."""
    hexes = {d.partition(":")[2] for d in gone}
    for dirpath, _, filenames in os.walk(store.repositories):
        base = os.path.basename(dirpath)
        if base == "_tags":
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as f:
                        variants = json.load(f).get("variants", {})
                except (OSError, ValueError, AttributeError):
                    continue
                if any(v in gone for v in variants.values()):
                    store.discard(Path(path))
        elif base in ("sha256", "sha512") and os.path.basename(os.path.dirname(dirpath)) in (
            "_manifests",
            "_layers",
        ):
            for name in filenames:
                if name in hexes:
                    store.discard(Path(dirpath, name))


class Reaper(Service):
    """Expiry and quota for one store. ``clock`` is the reactor (IReactorTime);
    ``run_in_thread(f, *args)`` runs blocking work off the reactor thread and returns a
    Deferred (unit tests pass a synchronous one)."""

    def __init__(
        self,
        clock: Any,
        store: Store,
        *,
        ttl: float,
        interval: float = 60.0,
        max_size: int = 0,
        high: float = 0.95,
        low: float = 0.85,
        run_in_thread: RunInThread,
        in_use: Callable[[str], bool] = lambda digest: False,
        forget: Callable[[str, str], None] = lambda kind, digest: None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._store = store
        self.ttl = ttl
        self.interval = interval
        self.max_size = max_size
        self.high = int(max_size * high)
        self.low = int(max_size * low)
        self._run = run_in_thread
        self.in_use = in_use
        self.forget = forget
        self._now = wall_clock
        self._db = StateDB(store.state / "reaper.sqlite3")
        self.entries: dict[str, Entry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._heap: list[tuple[float, str]] = []
        self._referrers: dict[str, set[str]] = {}
        self._reserved: dict[object, int] = {}
        self._dirty: dict[str, Entry | None] = {}
        self.usage = 0
        self.ready = False
        self._loop: LoopingCall | None = None
        self._ticking = False
        self._saving: Deferred[Any] | None = None
        self.stats = {"expired": 0, "evicted": 0, "freed": 0}

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = self.load()
        d.addCallback(lambda _: self._start_loop())
        d.addErrback(lambda f: log.failure("the reaper could not start", f))

    def _start_loop(self) -> None:
        if self.interval > 0 and self.running:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self._clock
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

        def work() -> tuple[dict[str, Entry] | None, dict[str, Found]]:
            return self._db.load(), scan_store(self._store)

        d = self._run(work)
        d.addCallback(lambda result: self._loaded(*result))
        return d

    def _loaded(
        self,
        saved: dict[str, Entry] | None,
        found: dict[str, Found],
    ) -> None:
        if saved is None and found:
            log.warn(
                "no usable reaper state: rebuilt from a scan of the store ({count} entries)",
                count=len(found),
            )
        saved = saved or {}
        dropped = 0
        for digest in saved:
            if digest not in found:
                dropped += 1
                self._dirty[digest] = None
        if dropped:
            log.info("dropped {count} entries whose files are gone", count=dropped)
        merged: dict[str, Entry] = {}
        for digest, (kind, size, mtime, refs) in found.items():
            entry = saved.get(digest)
            if entry is None or entry.size != size or entry.kind != kind:
                entry = Entry(kind, size, mtime, refs)
                self._dirty[digest] = entry
            merged[digest] = entry
        # Whatever happened while we were loading is newer than the files.
        merged.update(self.entries)
        self.entries = {}
        self._lru.clear()
        self._heap.clear()
        self._referrers.clear()
        self.usage = 0
        for digest, entry in sorted(merged.items(), key=lambda item: item[1].last_used):
            self._insert(digest, entry)
        self.ready = True
        log.info(
            "reaper: {count} entries, {usage} bytes in the store",
            count=len(self.entries),
            usage=self.usage,
        )

    # -- what the cache tells us -----------------------------------------------------

    def added(self, kind: str, digest: str, size: int, refs: tuple[str, ...] = ()) -> None:
        entry = self.entries.get(digest)
        if entry is not None:
            self.used(digest)
            return
        entry = Entry(kind, size, self._now(), refs)
        self._insert(digest, entry)
        self._dirty[digest] = entry
        if self.max_size and self.usage + self.reserved > self.high:
            self._clock.callLater(0, self.evict)

    def used(self, digest: str) -> None:
        entry = self.entries.get(digest)
        if entry is None:
            return
        entry.last_used = self._now()
        self._lru.move_to_end(digest)
        self._dirty[digest] = entry
        for ref in entry.refs:  # using a manifest keeps what it references alive
            child = self.entries.get(ref)
            if child is not None and child.kind == MANIFEST:
                child.last_used = entry.last_used
                self._lru.move_to_end(ref)
                self._dirty[ref] = child

    @property
    def reserved(self) -> int:
        return sum(self._reserved.values())

    def reserve(self, key: object, size: int) -> bool:
        """Count a fetch in flight; False when it cannot fit even after eviction (then
        it is passed through, not cached)."""
        if self.max_size and size > self.low:
            return False
        self._reserved[key] = size
        if self.max_size and self.usage + self.reserved > self.high:
            self.evict()
        return True

    def release(self, key: object) -> None:
        self._reserved.pop(key, None)

    # -- bookkeeping -----------------------------------------------------------------

    def _insert(self, digest: str, entry: Entry) -> None:
        self.entries[digest] = entry
        self._lru[digest] = None
        self._lru.move_to_end(digest)
        self.usage += entry.size
        for ref in entry.refs:
            self._referrers.setdefault(ref, set()).add(digest)
        if self.ttl > 0:
            heapq.heappush(self._heap, (entry.last_used + self.ttl, digest))

    def _drop(self, digest: str) -> Entry | None:
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
        self._dirty[digest] = None
        self.forget(entry.kind, digest)
        return entry

    def referenced(self, digest: str) -> bool:
        return bool(self._referrers.get(digest))

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
        if not self.ready:
            return None
        d = Deferred.fromCoroutine(self._evict())
        d.addErrback(lambda f: log.failure("eviction failed", f))
        return d

    async def _expire(self) -> None:
        if self.ttl <= 0:
            return
        now = self._now()
        due: list[str] = []
        handled = 0
        while self._heap and self._heap[0][0] <= now:
            _, digest = heapq.heappop(self._heap)
            entry = self.entries.get(digest)
            handled += 1
            if entry is not None:
                current = entry.last_used + self.ttl
                if current > now:
                    heapq.heappush(self._heap, (current, digest))
                elif self.in_use(digest):
                    heapq.heappush(self._heap, (now + self.interval, digest))
                else:
                    due.append(digest)
            if handled % SLICE == 0:
                await self._yield()
        removed = self._remove(due, "expired")
        # Blobs that no live manifest references any more go with their manifests.
        orphans = [
            ref
            for digest, entry in removed
            if entry.kind == MANIFEST
            for ref in entry.refs
            if ref in self.entries and not self.referenced(ref) and not self.in_use(ref)
        ]
        self._remove(list(dict.fromkeys(orphans)), "expired")
        await self._delete([d for d, _ in removed] + orphans)

    async def _evict(self) -> None:
        if not self.max_size or self.usage + self.reserved <= self.high:
            return
        victims: list[str] = []
        projected = self.usage + self.reserved
        for count, digest in enumerate(list(self._lru)):
            if projected <= self.low:
                break
            if self.in_use(digest):
                continue
            victims.append(digest)
            projected -= self.entries[digest].size
            if count % SLICE == SLICE - 1:
                await self._yield()
        removed = self._remove(victims, "evicted")
        log.info(
            "quota: evicted {count} entries; {usage} bytes in use (high {high}, low {low})",
            count=len(removed),
            usage=self.usage,
            high=self.high,
            low=self.low,
        )
        await self._delete([d for d, _ in removed])

    def _remove(self, digests: list[str], why: str) -> list[tuple[str, Entry]]:
        removed = []
        for digest in digests:
            entry = self._drop(digest)
            if entry is not None:
                removed.append((digest, entry))
                self.stats[why] += 1
        return removed

    async def _delete(self, digests: list[str]) -> None:
        if not digests:
            return
        for i in range(0, len(digests), 1000):
            freed = await self._run(remove_files, self._store, digests[i : i + 1000])
            self.stats["freed"] += freed
        log.info("reaper removed {count} files", count=len(digests))

    async def _yield(self) -> None:
        d: Deferred[None] = Deferred()
        self._clock.callLater(0, d.callback, None)
        await d

    async def flush(self) -> None:
        if not self._dirty:
            return
        changes, self._dirty = self._dirty, {}
        try:
            await self._run(self._db.save, changes)
        except Exception:
            log.failure("cannot save the reaper state; will retry")
            changes.update(self._dirty)
            self._dirty = changes
