"""The reaper with a Clock: deadlines, last use, quota, persistence, rebuilds."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.domain.references import manifest_references
from regmirror.expiry.ledger import Ledger
from regmirror.expiry.reaper import Reaper
from regmirror.expiry.state import StateDB
from regmirror.storage.store import Store


def sync(f: Any, *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    s.prepare()
    return s


def make_reaper(
    store: Store,
    clock: Clock,
    *,
    in_use: Callable[[Digest], bool] = lambda digest: False,
    on_removed: Callable[[Kind, Digest], None] = lambda kind, digest: None,
    **kwargs: Any,
) -> Reaper:
    kwargs.setdefault("ttl", 100.0)
    ledger = Ledger(clock, wall_clock=clock.seconds, **kwargs)
    reaper = Reaper(
        clock,
        store,
        ledger,
        run_in_thread=sync,
        interval=10.0,
        in_use=in_use,
        on_removed=on_removed,
    )
    reaper.load()
    return reaper


def put_blob(store: Store, data: bytes) -> Digest:
    digest = Digest.of(data)
    path = store.blob_path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def put_manifest(
    store: Store, refs: list[Digest], tag: str | None = None, name: str = "a"
) -> Digest:
    data = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"digest": str(refs[0]), "size": 1},
            "layers": [{"digest": str(r), "size": 1} for r in refs[1:]],
        }
    ).encode()
    digest = Digest.of(data)
    store.write_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    if tag is not None:
        store.write_tag(
            "up", name, tag, {"application/vnd.oci.image.manifest.v1+json": str(digest)}
        )
    return digest


def test_content_expires_ttl_after_its_last_use(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    blob = put_blob(store, b"layer")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    clock.advance(50)
    reaper.ledger.used(blob)  # the deadline moves to 150
    clock.advance(60)
    reaper.tick()
    assert store.blob_path(blob).exists()
    clock.advance(41)
    reaper.tick()
    assert not store.blob_path(blob).exists()
    assert blob not in reaper.entries and reaper.usage == 0


def test_ttl_zero_disables_expiry(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock, ttl=0)
    blob = put_blob(store, b"layer")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    clock.advance(10**9)
    reaper.tick()
    assert store.blob_path(blob).exists()


def test_content_in_use_is_not_expired(store: Store) -> None:
    clock = Clock()
    reading: set[Digest] = set()
    reaper = make_reaper(store, clock, in_use=lambda d: d in reading)
    blob = put_blob(store, b"layer")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    reading.add(blob)
    clock.advance(200)
    reaper.tick()
    assert store.blob_path(blob).exists()
    reading.clear()
    clock.advance(11)
    reaper.tick()
    assert not store.blob_path(blob).exists()


def test_expired_manifest_takes_its_tags_and_the_blobs_only_it_referenced(store: Store) -> None:
    clock = Clock()
    forgotten: list[Digest] = []
    reaper = make_reaper(store, clock, on_removed=lambda kind, d: forgotten.append(d))
    shared = put_blob(store, b"shared layer")
    own = put_blob(store, b"own layer")
    config = put_blob(store, b"config")
    old = put_manifest(store, [config, own, shared], tag="old")
    other_config = put_blob(store, b"other config")
    live = put_manifest(store, [other_config, shared], tag="live", name="b")
    for digest in (shared, own, config, other_config):
        reaper.ledger.added(Kind.BLOB, digest, 1)
    reaper.ledger.added(
        Kind.MANIFEST, old, 1, manifest_references(store.blob_path(old).read_bytes())
    )
    reaper.ledger.added(
        Kind.MANIFEST, live, 1, manifest_references(store.blob_path(live).read_bytes())
    )
    clock.advance(60)
    for digest in (live, shared, other_config, own, config):
        reaper.ledger.used(digest)  # only the old manifest goes stale
    clock.advance(60)
    reaper.tick()
    assert not store.blob_path(old).exists()
    assert store.read_tag("up", "a", "old") == {}
    assert old in forgotten
    # Its own blobs went with it; the blob a live manifest references stayed.
    assert not store.blob_path(own).exists()
    assert not store.blob_path(config).exists()
    assert store.blob_path(shared).exists()
    assert store.read_tag("up", "b", "live") != {}


def test_state_survives_a_restart_without_resetting_deadlines(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    blob = put_blob(store, b"layer")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    clock.advance(70)
    reaper.tick()  # flushes
    clock2 = Clock()
    clock2.advance(70)
    again = make_reaper(store, clock2)
    assert again.entries[blob].last_used == 0.0
    clock2.advance(31)
    again.tick()
    assert not store.blob_path(blob).exists()


def test_a_corrupt_state_file_is_rebuilt_from_the_store(store: Store) -> None:
    blob = put_blob(store, b"layer")
    (store.state / "reaper.sqlite3").write_bytes(b"this is not a database" * 100)
    reaper = make_reaper(store, Clock())
    assert reaper.ready
    assert set(reaper.entries) == {blob}
    assert reaper.usage == 5


def test_entries_whose_files_are_gone_are_dropped_at_start(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    blob = put_blob(store, b"layer")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    reaper.tick()
    os.unlink(store.blob_path(blob))
    assert make_reaper(store, clock).entries == {}


def test_quota_evicts_least_recently_used_down_to_the_low_watermark(store: Store) -> None:
    clock = Clock()
    reading: set[Digest] = set()
    reaper = make_reaper(
        store, clock, ttl=0, max_size=1000, high=0.9, low=0.5, in_use=lambda d: d in reading
    )
    blobs = []
    for i in range(9):
        blob = put_blob(store, bytes([i]) * 100)
        reaper.ledger.added(Kind.BLOB, blob, 100)
        blobs.append(blob)
        clock.advance(1)
    reading.add(blobs[0])  # the oldest, but being read
    reaper.ledger.used(blobs[1])  # recently used: kept
    blob = put_blob(store, b"x" * 100)
    reaper.ledger.added(Kind.BLOB, blob, 100)  # 1000 > 900: evict down to 500
    clock.advance(0)
    assert reaper.usage <= 500
    kept = {b for b in [*blobs, blob] if store.blob_path(b).exists()}
    assert {blobs[0], blobs[1], blob} <= kept
    assert reaper.usage == 100 * len(kept)


def test_a_fetch_larger_than_the_quota_is_not_reserved(store: Store) -> None:
    reaper = make_reaper(store, Clock(), max_size=1000, high=0.9, low=0.5)
    assert reaper.ledger.reserve(Digest.of(b"big"), 600) is False
    assert reaper.ledger.reserve(Digest.of(b"small"), 400) is True
    assert reaper.ledger.reserved == 400
    reaper.ledger.release(Digest.of(b"small"))
    assert reaper.ledger.reserved == 0


def test_a_large_sweep_runs_in_slices(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    for i in range(2000):
        reaper.ledger.added(Kind.BLOB, Digest.of(str(i).encode()), 1)
    clock.advance(101)
    d = reaper.tick()
    assert d is not None
    assert len(reaper.entries) == 2000  # the first slice is done, the rest waits a turn
    assert clock.getDelayedCalls()
    while clock.getDelayedCalls() and reaper.entries:
        clock.advance(0)
    assert reaper.entries == {}


def test_manifest_references_of_images_and_indexes() -> None:
    a, b = Digest("sha256", "a" * 64), Digest("sha256", "b" * 64)
    image = json.dumps(
        {"config": {"digest": str(a)}, "layers": [{"digest": str(b)}, {"digest": "bad"}]}
    )
    assert manifest_references(image.encode()) == (a, b)
    index = json.dumps({"manifests": [{"digest": str(a)}, {"digest": str(b)}]})
    assert manifest_references(index.encode()) == (a, b)
    assert manifest_references(b"not json") == ()


def test_a_failing_removal_listener_still_lets_the_files_go(store: Store) -> None:
    clock = Clock()

    def on_removed(kind: Kind, digest: Digest) -> None:
        raise RuntimeError("listener bug")

    reaper = make_reaper(store, clock, on_removed=on_removed)
    blob = put_blob(store, b"layer")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    clock.advance(101)
    reaper.tick()
    assert not store.blob_path(blob).exists()
    assert reaper.entries == {} and reaper.stats["expired"] == 1


class Later:
    """``run_in_thread`` that runs nothing until told: what a reactor sees while a
    thread works."""

    def __init__(self) -> None:
        self.calls: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((d, f, args))
        return d

    def run_all(self, clock: Clock) -> None:
        while self.calls or clock.getDelayedCalls():
            while self.calls:
                d, f, args = self.calls.pop(0)
                maybeDeferred(f, *args).chainDeferred(d)
            clock.advance(0)


def saved(store: Store) -> dict[Digest, float]:
    """Last use per digest, as the state database has it (read by another connection)."""
    return {d: e.last_used for d, e in StateDB(store.reaper_state).peek().items()}


def test_uses_are_coalesced_in_memory_and_written_once_per_tick(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    blob = put_blob(store, b"layer")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    reaper.tick()
    clock.advance(30)
    for _ in range(1000):
        reaper.ledger.used(blob)
    assert reaper.ledger.peek().touched == {blob: 30.0}
    assert saved(store) == {blob: 0.0}  # nothing written per hit
    assert reaper.entries[blob].last_used == 30.0  # the reaper knows, all the same
    reaper.tick()
    assert saved(store) == {blob: 30.0}
    assert not reaper.ledger.peek()


def test_memory_holds_what_changed_not_the_entries(store: Store) -> None:
    for i in range(3000):
        put_blob(store, b"blob %d" % i)
    reaper = make_reaper(store, Clock())
    assert reaper.ready and reaper.entry_count == 3000 and len(reaper.entries) == 3000
    assert reaper.usage == sum(len(b"blob %d" % i) for i in range(3000))
    containers = [v for v in vars(reaper.ledger).values() if isinstance(v, dict | set | list)]
    assert all(len(c) <= 1 for c in containers)  # the evictor; no entry is in memory


def test_what_the_mirror_records_while_the_state_settles_wins(store: Store) -> None:
    clock = Clock()
    clock.advance(1000)
    early = put_blob(store, b"old layer, just used")
    purged = put_blob(store, b"purged layer")
    for digest in (early, purged):
        os.utime(store.blob_path(digest), (0, 0))  # last used long ago, says the file
    later = Later()
    ledger = Ledger(clock, ttl=100.0, wall_clock=clock.seconds)
    reaper = Reaper(
        clock,
        store,
        ledger,
        run_in_thread=later,
        interval=10.0,
        in_use=lambda d: False,
        on_removed=lambda kind, d: None,
    )
    reaper.load()  # settling in its thread; the mirror serves meanwhile
    assert not reaper.ready
    ledger.used(early)
    ledger.drop(purged)
    os.unlink(store.blob_path(purged))
    new = put_blob(store, b"new layer")
    os.utime(store.blob_path(new), (0, 0))  # the scan may see it: the ledger's time wins
    ledger.added(Kind.BLOB, new, 9)
    later.run_all(clock)
    assert reaper.ready
    reaper.tick()
    later.run_all(clock)
    assert saved(store) == {early: 1000.0, new: 1000.0}
    assert store.blob_path(early).exists()  # its use counted, not the file's mtime
    assert reaper.entry_count == 2 and reaper.usage == len(b"old layer, just used") + 9
    clock.advance(101)
    reaper.tick()
    later.run_all(clock)
    assert not store.blob_path(early).exists() and reaper.entry_count == 0


def test_files_without_an_entry_are_adopted_with_their_mtime(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    kept = put_blob(store, b"known")
    reaper.ledger.added(Kind.BLOB, kept, 5)
    reaper.tick()
    stray = put_blob(store, b"committed, then killed before the state was written")
    os.utime(store.blob_path(stray), (50, 50))
    clock.advance(120)
    again = make_reaper(store, clock)
    assert again.entries[stray].last_used == 50.0
    again.tick()  # both expired: the known one at 100, the stray one at 150
    assert not store.blob_path(kept).exists() and store.blob_path(stray).exists()
    clock.advance(31)
    again.tick()
    assert not store.blob_path(stray).exists()


def test_using_a_manifest_list_keeps_the_manifests_it_lists_alive(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    config = put_blob(store, b"config")
    image = put_manifest(store, [config])
    index = json.dumps({"manifests": [{"digest": str(image)}]}).encode()
    index_digest = Digest.of(index)
    store.write_manifest(index_digest, index, "application/vnd.oci.image.index.v1+json")
    reaper.ledger.added(Kind.BLOB, config, 6)
    reaper.ledger.added(Kind.MANIFEST, image, 1, (config,))
    reaper.ledger.added(Kind.MANIFEST, index_digest, 1, (image,))
    reaper.tick()
    clock.advance(60)
    reaper.ledger.used(index_digest)
    reaper.ledger.used(config)
    reaper.tick()
    clock.advance(60)  # 120: only what the index kept alive is not due
    reaper.tick()
    assert store.blob_path(image).exists() and store.blob_path(index_digest).exists()
    clock.advance(41)
    reaper.tick()
    assert not store.blob_path(image).exists() and not store.blob_path(index_digest).exists()


def test_a_state_written_by_the_previous_version_is_kept(store: Store) -> None:
    layer = put_blob(store, b"layer")
    config = put_blob(store, b"config")
    manifest = put_manifest(store, [config, layer])
    old = sqlite3.connect(store.reaper_state)
    old.execute(
        "CREATE TABLE entries (digest TEXT PRIMARY KEY, kind TEXT NOT NULL,"
        " size INTEGER NOT NULL, last_used REAL NOT NULL, refs TEXT NOT NULL)"
    )
    rows = [
        (str(layer), "blob", 5, 60.0, "[]"),
        (str(config), "blob", 6, 60.0, "[]"),
        (str(manifest), "manifest", 1, 10.0, json.dumps([str(config), str(layer)])),
    ]
    old.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", rows)
    old.commit()
    old.close()
    clock = Clock()
    clock.advance(120)
    reaper = make_reaper(store, clock)
    assert {d: reaper.entries[d].last_used for d in reaper.entries} == {
        layer: 60.0,
        config: 60.0,
        manifest: 10.0,
    }
    reaper.tick()  # the manifest expired; the blobs only it referenced go with it
    assert reaper.entries == {} and reaper.stats["expired"] == 3


def test_a_purge_is_written_at_the_next_tick_and_counted_at_once(store: Store) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock, ttl=0, max_size=1000)
    blob = put_blob(store, b"layer")
    other = put_blob(store, b"other")
    reaper.ledger.added(Kind.BLOB, blob, 5)
    reaper.ledger.added(Kind.BLOB, other, 5)
    reaper.tick()
    reaper.ledger.drop(blob)
    assert blob not in reaper.entries
    reaper.tick()
    assert set(saved(store)) == {other}
    assert reaper.entry_count == 1 and reaper.usage == 5


def test_an_entry_used_while_the_eviction_asks_the_database_is_kept(store: Store) -> None:
    clock = Clock()
    later = Later()
    ledger = Ledger(clock, ttl=0, max_size=1000, high=0.9, low=0.5, wall_clock=clock.seconds)
    reaper = Reaper(
        clock,
        store,
        ledger,
        run_in_thread=later,
        interval=10.0,
        in_use=lambda d: False,
        on_removed=lambda kind, d: None,
    )
    reaper.load()
    later.run_all(clock)
    blobs = []
    for i in range(10):
        blobs.append(put_blob(store, bytes([i]) * 100))
        ledger.added(Kind.BLOB, blobs[-1], 100)
        clock.advance(1)
    while later.calls and later.calls[0][1] != reaper._db.oldest:
        d, f, args = later.calls.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)
        clock.advance(0)
    assert later.calls, "the eviction asks the database for the oldest entries"
    ledger.used(blobs[0])  # the oldest, used while the query runs in its thread
    later.run_all(clock)
    assert store.blob_path(blobs[0]).exists()
    assert not store.blob_path(blobs[1]).exists()
    assert reaper.usage <= 500


def test_stopping_while_settling_cancels_it_and_leaves_the_state_as_it_was(
    store: Store,
) -> None:
    clock = Clock()
    reaper = make_reaper(store, clock)
    known = put_blob(store, b"known")
    reaper.ledger.added(Kind.BLOB, known, 5)
    reaper.tick()
    put_blob(store, b"not adopted yet")
    later = Later()
    again = Reaper(
        clock,
        store,
        Ledger(clock, ttl=100.0, wall_clock=clock.seconds),
        run_in_thread=later,
        interval=10.0,
        in_use=lambda d: False,
        on_removed=lambda kind, d: None,
    )
    again.startService()
    assert again.stopService() is None  # nothing to wait for: the walk stops
    later.run_all(clock)
    assert not again.ready and not clock.getDelayedCalls()  # not tried again
    assert set(saved(store)) == {known}
