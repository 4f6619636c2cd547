"""The ledger's state on disk: SQLite from the standard library, WAL.

Only what changed is written at each tick (a JSON rewrite of 100,000 entries would hold
the GIL for a noticeable time on every save). Digests and kinds are stored as text and
parsed back here, at the boundary: a row that does not parse makes the state unusable,
and the reaper rebuilds it from a scan of the store.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from regmirror.domain.digest import Digest
from regmirror.domain.errors import DigestInvalid
from regmirror.domain.kinds import Kind
from regmirror.expiry.ledger import Entry
from regmirror.logs import get_logger

log = get_logger()


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

    def load(self) -> dict[Digest, Entry] | None:
        """The saved entries, or None when there is no usable state."""
        if not self.path.exists():
            return None
        try:
            db = self._connect()
            try:
                rows = db.execute("SELECT digest, kind, size, last_used, refs FROM entries")
                return {
                    Digest.parse(digest): Entry(
                        Kind(kind),
                        int(size),
                        float(last_used),
                        tuple(Digest.parse(ref) for ref in json.loads(refs)),
                    )
                    for digest, kind, size, last_used, refs in rows
                }
            finally:
                db.close()
        except (sqlite3.Error, ValueError, TypeError, DigestInvalid) as e:
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

    def peek(self) -> dict[Digest, Entry]:
        """The saved entries, read-only (another process, the CLI, while a mirror may
        run): rows that do not parse are left out, nothing is changed or created."""
        if not self.path.exists():
            return {}
        try:
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                rows = list(db.execute("SELECT digest, kind, size, last_used, refs FROM entries"))
            finally:
                db.close()
        except sqlite3.Error:
            return {}
        found = {}
        for digest, kind, size, last_used, refs in rows:
            try:
                found[Digest.parse(digest)] = Entry(
                    Kind(kind),
                    int(size),
                    float(last_used),
                    tuple(Digest.parse(ref) for ref in json.loads(refs)),
                )
            except (ValueError, TypeError, DigestInvalid):
                continue
        return found

    def save(self, changes: dict[Digest, Entry | None]) -> None:
        """Write what changed: an entry, or None for one that was removed."""
        db = self._connect()
        try:
            with db:
                db.executemany(
                    "DELETE FROM entries WHERE digest = ?",
                    [(str(d),) for d, e in changes.items() if e is None],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            str(d),
                            str(e.kind),
                            e.size,
                            e.last_used,
                            json.dumps([str(ref) for ref in e.refs]),
                        )
                        for d, e in changes.items()
                        if e is not None
                    ],
                )
        finally:
            db.close()
