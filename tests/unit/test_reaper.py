"""The reaper with a Clock: deadlines, last use, quota, persistence, rebuilds."""

from __future__ import annotations

import json
import os
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
