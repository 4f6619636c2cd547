"""The ledger on disk: every entry of the store in SQLite (standard library, WAL), with
the indexes that expiry and eviction need, so that memory does not grow with the store.

Tables::

    entries (digest TEXT PRIMARY KEY, kind, size, last_used, refs)   one row per blob
                                   or manifest; refs: the JSON list a manifest references
    entries_by_use ON entries(last_used)   expiry (last use + ttl <= now) and the LRU
                                   order (eviction) are both this one order
    refs (manifest, ref)           who references what, derived from entries.refs; indexed
                                   both ways (a manifest's references, a digest's referrers)

The ``entries`` table is the one the state always had (a store written by an older
version loads as it is; ``refs`` is rebuilt from it at every start). Digests and kinds
are stored as text and parsed back here, at the boundary. The database is an index of
the store, never the only copy of anything: missing or corrupt, it is rebuilt from a
scan (``settle``).

Every method runs in a thread (the reaper's ``run_in_thread``); one connection, used by
one call at a time (a lock). ``get`` and ``digests`` are for inspection and tests.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.errors import DigestInvalid
from regmirror.domain.kinds import Kind
from regmirror.expiry.ledger import Entry, Pending
from regmirror.logs import get_logger
from regmirror.storage.store import Listed, Named, Store

log = get_logger()

BATCH = 5000  # rows per executemany while settling
_CACHE_KIB = 8192  # SQLite's page cache: the memory the ledger needs, whatever its size

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (digest TEXT PRIMARY KEY, kind TEXT NOT NULL,"
    " size INTEGER NOT NULL, last_used REAL NOT NULL, refs TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_by_use ON entries (last_used)",
    "CREATE TABLE IF NOT EXISTS refs (manifest TEXT NOT NULL, ref TEXT NOT NULL,"
    " PRIMARY KEY (manifest, ref)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS refs_by_ref ON refs (ref)",
)
_VERSION = 1  # PRAGMA user_version: the schema above is there
_COLUMNS = "rowid, digest, kind, size, last_used, refs"


class Cancelled(Exception):
    """``StateDB.settle`` was cancelled (the mirror is stopping)."""


@attrs.frozen
class Row:
    """One entry as the database has it; ``at`` is its place in the last-use order
    (where a query of the next rows resumes)."""

    digest: Digest
    entry: Entry
    at: tuple[float, int]


@attrs.frozen
class Settled:
    """The state after ``settle``: totals, and what was dropped or adopted."""

    entries: int
    usage: int
    dropped: int  # entries whose files are gone
    adopted: int  # files without an entry (or with a different one)
    rebuilt: bool  # there was no usable state


@attrs.frozen
class Delta:
    """What a write changed in the totals."""

    entries: int = 0
    usage: int = 0


class StateDB:
    """Entries in SQLite (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    # -- the connection ----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(
                self.path, timeout=30, check_same_thread=False, isolation_level=None
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
                db.execute("PRAGMA temp_store=FILE")
                db.execute("PRAGMA journal_size_limit=67108864")
                if db.execute("PRAGMA user_version").fetchone()[0] < _VERSION:
                    self._upgrade(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Create the tables and indexes; a state written before the ``refs`` table
        existed gets it from the JSON lists in ``entries``."""
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(
                "INSERT OR IGNORE INTO refs (manifest, ref) SELECT e.digest, j.value"
                " FROM entries e, json_each(e.refs) j WHERE e.kind = 'manifest'"
                " AND json_valid(e.refs) AND j.type = 'text'"
            )
            db.execute(f"PRAGMA user_version = {_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def cancel(self) -> None:
        """Stop a ``settle`` running in another thread at its next batch (shutting
        down): it raises ``Cancelled`` and leaves the state as it was."""
        self._cancelled.set()

    def _check(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled("settling the reaper state was cancelled")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _discard(self) -> None:
        """Remove an unusable database (and its WAL) so that a new one is made."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    # -- start-up ----------------------------------------------------------------------

    def settle(self, store: Store) -> Settled:
        """Make the entries what ``store`` holds: entries whose files are gone are
        dropped, files without an entry (or of another kind) are adopted with their
        mtime as last use and, for a manifest, what it references. Missing or corrupt
        state is rebuilt from a new walk, with a warning. Memory stays bounded: the
        names go through a temporary table, ``BATCH`` rows at a time; only the files
        without an entry are ``stat``-ed (content under a digest does not change)."""
        with self._lock:
            existed = self.path.exists()
            try:
                return self._settle(store, rebuilt=not existed)
            except sqlite3.DatabaseError as e:
                if not existed or _busy(e):
                    raise
                log.warn(
                    "reaper state {path} is unusable ({error}); rebuilding it",
                    path=str(self.path),
                    error=e,
                )
            self._discard()
            return self._settle(store, rebuilt=True)

    def _settle(self, store: Store, *, rebuilt: bool) -> Settled:
        db = self._connect()
        empty = db.execute("SELECT NOT EXISTS (SELECT 1 FROM entries)").fetchone()[0]
        db.execute("BEGIN")
        try:
            if empty:
                dropped, adopted = 0, self._adopt_all(db, store)
            else:
                dropped, adopted = self._reconcile(db, store)
            count, usage = db.execute("SELECT count(*), total(size) FROM entries").fetchone()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return Settled(int(count), int(usage), dropped, adopted, rebuilt or bool(empty))

    def _adopt_all(self, db: sqlite3.Connection, store: Store) -> int:
        """No entries yet: every file is adopted (the last-use index is built once, at
        the end: faster than a million inserts into it)."""
        db.execute("DROP INDEX IF EXISTS entries_by_use")
        db.execute("DELETE FROM refs")  # of no entry
        adopted = 0
        listed = store.listing()
        while batch := list(itertools.islice(listed, BATCH)):
            self._check()
            adopted += self._insert(db, store, batch)
        db.execute("CREATE INDEX entries_by_use ON entries (last_used)")
        return adopted

    def _reconcile(self, db: sqlite3.Connection, store: Store) -> tuple[int, int]:
        db.execute("DROP TABLE IF EXISTS temp.seen")
        db.execute(
            "CREATE TEMP TABLE seen (digest TEXT PRIMARY KEY, kind TEXT NOT NULL) WITHOUT ROWID"
        )
        names = store.names()
        while batch := list(itertools.islice(names, BATCH)):
            self._check()
            db.executemany("INSERT OR REPLACE INTO seen VALUES (?, ?)", batch)
        dropped = db.execute(
            "DELETE FROM entries WHERE NOT EXISTS (SELECT 1 FROM seen s"
            " WHERE s.digest = entries.digest AND s.kind = entries.kind)"
        ).rowcount
        if dropped:
            db.execute(
                "DELETE FROM refs WHERE NOT EXISTS"
                " (SELECT 1 FROM entries e WHERE e.digest = refs.manifest)"
            )
        adopted, last = 0, ""
        while new := db.execute(
            "SELECT digest, kind FROM seen s WHERE digest > ? AND NOT EXISTS"
            " (SELECT 1 FROM entries e WHERE e.digest = s.digest) ORDER BY digest LIMIT ?",
            (last, BATCH),
        ).fetchall():
            self._check()
            last = new[-1][0]
            listed = [store.stat_named(Named(digest, kind)) for digest, kind in new]
            adopted += self._insert(db, store, [x for x in listed if x is not None])
        db.execute("DROP TABLE temp.seen")
        return dropped, adopted

    def _insert(self, db: sqlite3.Connection, store: Store, batch: list[Listed]) -> int:
        refs = {x.digest: store.manifest_refs(x.digest) for x in batch if x.kind == Kind.MANIFEST}
        db.executemany(
            "INSERT OR REPLACE INTO entries (digest, kind, size, last_used, refs)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (x.digest, x.kind, x.size, x.mtime, json.dumps([str(r) for r in refs[x.digest]]))
                if x.digest in refs
                else (*x, "[]")
                for x in batch
            ],
        )
        db.executemany(
            "INSERT OR IGNORE INTO refs VALUES (?, ?)",
            [(digest, str(ref)) for digest, targets in refs.items() for ref in targets],
        )
        return len(batch)

    # -- what the ledger changed ---------------------------------------------------------

    def flush(self, pending: Pending) -> Delta:
        """Write what the ledger recorded since the last flush: removals first, then
        additions (one of an entry already there is a use), then uses (a manifest's use
        is also one of the manifests it lists, as ``Ledger.used`` documents)."""
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                delta = self._write(db, pending.dropped, pending.added, pending.touched)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return delta

    def _write(
        self,
        db: sqlite3.Connection,
        dropped: Iterable[Digest],
        added: Mapping[Digest, Entry],
        touched: Mapping[Digest, float],
    ) -> Delta:
        entries = usage = 0
        for digest in dropped:
            for (size,) in db.execute(
                "DELETE FROM entries WHERE digest = ? RETURNING size", (str(digest),)
            ).fetchall():
                entries -= 1
                usage -= size
            db.execute("DELETE FROM refs WHERE manifest = ?", (str(digest),))
        uses = {str(d): t for d, t in touched.items()}
        for digest, entry in added.items():
            text = str(digest)
            refs = [str(ref) for ref in entry.refs]
            inserted = db.execute(
                "INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?)",
                (text, str(entry.kind), entry.size, entry.last_used, json.dumps(refs)),
            ).rowcount
            if inserted:
                entries += 1
                usage += entry.size
                db.executemany(
                    "INSERT OR IGNORE INTO refs VALUES (?, ?)", [(text, ref) for ref in refs]
                )
            else:
                uses[text] = max(uses.get(text, 0.0), entry.last_used)
        if uses:
            db.executemany(
                "UPDATE entries SET last_used = max(last_used, ?) WHERE digest = ?",
                [(t, d) for d, t in uses.items()],
            )
            db.executemany(
                "UPDATE entries SET last_used = max(last_used, ?) WHERE kind = 'manifest'"
                " AND digest IN (SELECT ref FROM refs WHERE manifest = ?)",
                [(t, d) for d, t in uses.items()],
            )
        return Delta(entries, usage)

    def remove(self, digests: Iterable[Digest]) -> list[Row]:
        """Delete entries; returns those that were there."""
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = []
                for digest in digests:
                    for row in db.execute(
                        f"DELETE FROM entries WHERE digest = ? RETURNING {_COLUMNS}",
                        (str(digest),),
                    ).fetchall():
                        parsed = _row(row)
                        if parsed is not None:
                            removed.append(parsed)
                    db.execute("DELETE FROM refs WHERE manifest = ?", (str(digest),))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return removed

    # -- what the reaper asks -----------------------------------------------------------

    def expired(self, cutoff: float, after: tuple[float, int] | None, limit: int) -> list[Row]:
        """Entries last used at or before ``cutoff``, least recently used first, from
        just after ``after`` (a previous answer's last ``Row.at``)."""
        return self._ordered("last_used <= ?", (cutoff,), after, limit)

    def oldest(self, after: tuple[float, int] | None, limit: int) -> list[Row]:
        """Entries in least-recently-used order, from just after ``after``."""
        return self._ordered("1", (), after, limit)

    def _ordered(
        self, where: str, args: tuple[float, ...], after: tuple[float, int] | None, limit: int
    ) -> list[Row]:
        if after is not None:
            where += " AND (last_used, rowid) > (?, ?)"
            args = (*args, *after)
        with self._lock:
            rows = self._connect().execute(
                f"SELECT {_COLUMNS} FROM entries INDEXED BY entries_by_use WHERE {where}"
                " ORDER BY last_used, rowid LIMIT ?",
                (*args, limit),
            )
            return [row for row in map(_row, rows) if row is not None]

    def unreferenced(self, digests: Iterable[Digest]) -> list[Row]:
        """Those of ``digests`` that are entries no manifest references."""
        with self._lock:
            db = self._connect()
            found = []
            for digest in dict.fromkeys(digests):
                row = db.execute(
                    f"SELECT {_COLUMNS} FROM entries WHERE digest = ? AND NOT EXISTS"
                    " (SELECT 1 FROM refs WHERE ref = ?)",
                    (str(digest), str(digest)),
                ).fetchone()
                parsed = _row(row) if row is not None else None
                if parsed is not None:
                    found.append(parsed)
            return found

    def get(self, digest: Digest) -> Entry | None:
        with self._lock:
            row = (
                self._connect()
                .execute(f"SELECT {_COLUMNS} FROM entries WHERE digest = ?", (str(digest),))
                .fetchone()
            )
        parsed = _row(row) if row is not None else None
        return parsed.entry if parsed is not None else None

    def digests(self) -> list[Digest]:
        with self._lock:
            rows = self._connect().execute("SELECT digest FROM entries").fetchall()
        out = []
        for (text,) in rows:
            try:
                out.append(Digest.parse(text))
            except DigestInvalid:
                continue
        return out

    # -- the CLI (another process: a mirror may run) -------------------------------------

    def peek(self) -> dict[Digest, Entry]:
        """The saved entries, read-only (another process, the CLI, while a mirror may
        run): rows that do not parse are left out, nothing is changed or created."""
        if not self.path.exists():
            return {}
        try:
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                rows = list(db.execute(f"SELECT {_COLUMNS} FROM entries"))
            finally:
                db.close()
        except sqlite3.Error:
            return {}
        return {row.digest: row.entry for row in map(_row, rows) if row is not None}

    def save(self, changes: Mapping[Digest, Entry | None]) -> None:
        """Write entries, or None for one that was removed (the CLI's purge, with no
        mirror running)."""
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                self._write(db, list(changes), {d: e for d, e in changes.items() if e}, {})
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise


def _busy(error: sqlite3.Error) -> bool:
    """The database is locked by someone else (not corrupt: try again later)."""
    return getattr(error, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _row(row: tuple[int, str, str, int, float, str]) -> Row | None:
    """A row parsed, or None when it does not parse (left out: the next start's scan
    adopts its file again)."""
    rowid, digest, kind, size, last_used, refs = row
    try:
        return Row(
            Digest.parse(digest),
            Entry(
                Kind(kind),
                int(size),
                float(last_used),
                tuple(Digest.parse(ref) for ref in json.loads(refs)),
            ),
            (float(last_used), int(rowid)),
        )
    except (ValueError, TypeError, DigestInvalid):
        return None
