"""A store of many entries: the mirror serves it before its reaper has settled (the walk
of the store and the reconciliation with the state run in a thread), survives a kill -9
while settling, then expires and evicts what it should, in least-recently-used order."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.integration.conftest import MakeMirror
from tests.support.mirror import Mirror
from tests.support.ports import free_port
from tests.support.rawhttp import request
from tests.support.synthstore import blob_data, blob_digest, build_store
from tests.support.wait import poll_until

ENTRIES = 20_000
OLD = ENTRIES // 2  # entries 0..OLD-1 were last used about two hours ago: past the TTL
SIZE = len(blob_data(0))


@contextmanager
def state_locked(mirror: Mirror) -> Iterator[None]:
    """Hold the write lock of the reaper's state database (as another process could):
    the mirror's settling waits for it, and the test sees the mirror before it settled."""
    path = mirror.root / "_state" / "reaper.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def settled_lines(mirror: Mirror) -> int:
    return len(re.findall(r"reaper: settled", mirror.log_text()))


def present(mirror: Mirror, indexes: range) -> set[int]:
    return {i for i in indexes if mirror.has_blob(blob_digest(i))}


def test_a_large_store_serves_before_it_settled_then_expires_and_evicts_in_lru_order(
    make_mirror: MakeMirror,
) -> None:
    now = time.time()
    mirror = make_mirror(
        f"http://127.0.0.1:{free_port()}",  # never asked: all of it is cached
        start=False,
        extra={
            "proxy": {"ttl": "1h"},
            "regmirror": {
                "reaper_interval": "0.5s",
                # the fresh half (10,000 x 32 B) is above the high watermark
                "max_size": 300_000,
                "high_watermark": 0.9,
                "low_watermark": 0.5,
            },
        },
    )
    # Entry i was last used 2 h ago (old half) or 50 min ago (fresh half), plus i / 10 s.
    build_store(
        mirror.root,
        ENTRIES,
        mtime=lambda i: now - (7200 if i < OLD else 3000 + OLD / 10) + i / 10,
    )
    # A first start, killed before it settled: nothing is lost.
    with state_locked(mirror):
        mirror.start()
        assert request(mirror.url, "GET", f"/v2/a/blobs/{blob_digest(OLD)}").body == blob_data(OLD)
        ready = request(mirror.url, "GET", "/readyz")
        assert ready.status == 503 and b"state is still being loaded" in ready.body
        assert settled_lines(mirror) == 0
        mirror.kill9()
    assert len(present(mirror, range(ENTRIES))) == ENTRIES
    # The second start: served before it settled, and what it served then counts.
    used = 7  # an old entry, used while the mirror settles: it stays
    with state_locked(mirror):
        mirror.start()
        response = request(mirror.url, "GET", f"/v2/a/blobs/{blob_digest(used)}")
        assert response.status == 200 and response.body == blob_data(used)
        assert settled_lines(mirror) == 0
    poll_until(lambda: settled_lines(mirror) == 1, 60, what="the reaper settled")
    poll_until(
        lambda: present(mirror, range(OLD)) == {used},
        60,
        what="the old half expired, but the entry used while settling",
        describe=lambda: f"{len(present(mirror, range(OLD)))} old entries left",
    )
    low = 150_000
    poll_until(
        lambda: len(present(mirror, range(OLD, ENTRIES))) * SIZE + SIZE <= low,
        60,
        what="the fresh half evicted down to the low watermark",
        describe=lambda: f"{len(present(mirror, range(OLD, ENTRIES)))} fresh entries left",
    )
    kept = present(mirror, range(OLD, ENTRIES))
    # Least recently used first: what is left is the newest, and as much as fits.
    assert kept == set(range(ENTRIES - len(kept), ENTRIES))
    assert (len(kept) + 2) * SIZE > low
    assert mirror.has_blob(blob_digest(used))
    evictions = re.findall(r"quota: evicted \d+ entries; (\d+) bytes in use", mirror.log_text())
    assert evictions and all(int(usage) <= low for usage in evictions), evictions
    # A restart with the state present settles to the same store, nothing more removed.
    mirror.restart()
    poll_until(lambda: settled_lines(mirror) == 2, 60, what="the reaper settled again")
    metrics = request(mirror.url, "GET", "/metrics").body.decode()
    assert f"regmirror_store_entries {float(len(kept) + 1)}" in metrics
    assert present(mirror, range(OLD, ENTRIES)) == kept
    path = Path(mirror.blob_path(blob_digest(ENTRIES - 1)))
    assert path.read_bytes() == blob_data(ENTRIES - 1)
