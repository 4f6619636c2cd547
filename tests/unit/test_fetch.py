"""A blob fetch: readers never see the last byte before the digest matched."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from regmirror.domain.digest import Digest
from regmirror.fetch import inflight as inflight_module
from regmirror.fetch.blobfetch import BlobFetch, DigestMismatch, State
from regmirror.fetch.heap import trim_heap
from regmirror.fetch.inflight import FetchLease, LocalInFlight, StartFetch
from regmirror.storage.store import Store


class Recorder:
    def __init__(self, changed: Callable[[], object]) -> None:
        self.changed = changed

    def fetch_changed(self) -> None:
        self.changed()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    s.prepare()
    return s


def test_last_byte_is_withheld_until_verified(store: Store) -> None:
    data = b"0123456789"
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    calls: list[int] = []
    fetch.follow(Recorder(lambda: calls.append(fetch.readable())))
    fetch.write(data[:5])
    assert fetch.readable() == 5 and calls == [5]
    fetch.write(data[5:9])
    assert fetch.readable() == 9  # everything but the last byte
    fetch.write(data[9:])
    assert fetch.state is State.COMMITTED
    assert fetch.readable() == 10
    assert store.blob_path(fetch.digest).read_bytes() == data
    assert list(store.tmp.iterdir()) == []


def test_mismatch_discards_the_file_and_fails_readers(store: Store) -> None:
    data = b"0123456789"
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    reader = fetch.open_reader()
    seen: list[tuple[bool, int]] = []

    fetch.follow(Recorder(lambda: seen.append((fetch.failed, fetch.readable()))))
    fetch.write(b"01234")
    fetch.write(b"5678X")
    assert seen == [(False, 5), (False, 9), (True, 0)]
    assert fetch.failed and isinstance(fetch.error, DigestMismatch)
    assert fetch.readable() == 0
    assert not store.blob_path(fetch.digest).exists()
    assert list(store.tmp.iterdir()) == []
    os.close(reader)


def test_short_body_fails(store: Store) -> None:
    data = b"0123456789"
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    fetch.write(b"0123")
    fetch.finish()
    assert fetch.failed
    assert list(store.tmp.iterdir()) == []


def test_too_long_body_fails(store: Store) -> None:
    data = b"0123456789"
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    fetch.write(data + b"!")
    assert fetch.failed
    assert not store.blob_path(fetch.digest).exists()


def test_unknown_length_is_verified_at_the_end(store: Store) -> None:
    data = b"abc" * 1000
    fetch = BlobFetch(store, Digest.of(data), None, fsync=False)
    fetch.write(data[:1000])
    assert fetch.readable() == 0
    fetch.write(data[1000:])
    fetch.finish()
    assert fetch.state is State.COMMITTED
    assert fetch.size == len(data)


def test_disk_full_fails_the_fetch_and_removes_the_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    data = b"0123456789"
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)

    def full(fd: int, b: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    fetch.write(b"01")
    monkeypatch.undo()
    assert fetch.failed
    assert list(store.tmp.iterdir()) == []


def test_threaded_writer_reports_on_the_reactor_thread(store: Store) -> None:
    from twisted.internet.task import Clock

    from regmirror.fetch.writers import threaded_writers

    class Reactor(Clock):
        def __init__(self) -> None:
            super().__init__()
            import queue

            self.calls: queue.SimpleQueue[tuple[object, tuple[object, ...]]] = queue.SimpleQueue()

        def callFromThread(self, f: object, *args: object) -> None:
            self.calls.put((f, args))

    reactor = Reactor()
    data = os.urandom(3 * 1024 * 1024)
    fetch = BlobFetch(
        store, Digest.of(data), len(data), fsync=True, writer=threaded_writers(reactor)
    )
    for i in range(0, len(data), 65536):
        fetch.write(data[i : i + 65536])
    while fetch.state is not State.COMMITTED:
        f, args = reactor.calls.get(timeout=10)
        f(*args)  # type: ignore[operator]
        assert fetch.readable() < len(data) or fetch.verified
    assert store.blob_path(fetch.digest).read_bytes() == data


def test_the_heap_is_trimmed_when_the_last_fetch_ends(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished download's chunks go back to the system, not kept in RSS; only once
    no other fetch runs (the others' chunks would be needed again at once)."""
    assert trim_heap() is True  # glibc: malloc_trim is there
    trims: list[int] = []
    monkeypatch.setattr(inflight_module, "trim_heap", lambda: bool(trims.append(1)) or True)
    inflight = LocalInFlight()
    fetches: list[BlobFetch] = []

    def start(data: bytes) -> StartFetch:
        async def go(lease: FetchLease) -> BlobFetch:
            fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False, on_done=lease.ended)
            lease.started(fetch)
            fetches.append(fetch)
            return fetch

        return go

    monkeypatch.setattr(inflight_module, "TRIM_AFTER", 5)
    for data in (b"large", b"smal", b"tiny"):
        Deferred.fromCoroutine(inflight.join_or_start(Digest.of(data), start(data)))
    assert inflight.count() == 3
    fetches[0].write(b"large")
    assert fetches[0].state is State.COMMITTED and trims == []  # the others still run
    fetches[1].write(b"smal")
    assert trims == []
    fetches[2].write(b"tiny")
    assert inflight.count() == 0 and trims == [1]  # the large one's, once all ended
    Deferred.fromCoroutine(inflight.join_or_start(Digest.of(b"next"), start(b"next")))
    fetches[3].write(b"next")
    assert trims == [1]  # a small fetch alone leaves nothing worth trimming


_HEAP_PROBE = """
import resource, sys
from regmirror.fetch.heap import tune_heap
assert tune_heap()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
seen = []
for _ in range(4):
    before = faults()
    buffer = b"x" * (2 << 20)  # a blob-sized buffer, filled, then freed
    del buffer
    seen.append(faults() - before)
print(*seen)
"""


def test_tuned_heap_serves_blob_buffers_from_pages_it_has() -> None:
    """After tune_heap, a freed 2 MiB buffer's pages serve the next one: no page fault
    (glibc's defaults map the second one afresh too, ~130 faults)."""
    done = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True
    )
    first, *later = (int(n) for n in done.stdout.split())
    assert first > 0 and later == [0, 0, 0], done.stdout


class ManualWriter:
    """A writer that does nothing by itself: the test plays its reports."""

    def __init__(
        self, fd: int, hasher: object, size: int | None, fsync: bool, events: object
    ) -> None:
        os.close(fd)

    def put(self, data: bytes) -> None:
        pass

    def end(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def abort(self) -> None:
        pass


def test_a_write_that_fails_after_the_hash_matched_fails_the_readers(store: Store) -> None:
    """The hash thread may finish before the disk writer: if the disk then fills up, the
    file lacks bytes that will never come, so readers must abort (not wait for them)."""
    import errno

    data = b"0123456789"
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False, writer=ManualWriter)
    fetch.write(data)
    fetch.on_progress(4, 10)
    fetch.on_hashed(10, Digest.of(data).hex)
    assert fetch.verified and fetch.readable() == 4
    fetch.on_write_failed(OSError(errno.ENOSPC, "No space left on device"))
    assert fetch.failed and fetch.state is State.FAILED
    assert list(store.tmp.iterdir()) == []


def test_a_commit_that_fails_after_a_complete_write_lets_readers_finish(store: Store) -> None:
    data = b"0123456789"
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False, writer=ManualWriter)
    fetch.write(data)
    fetch.on_progress(10, 10)
    fetch.on_hashed(10, Digest.of(data).hex)
    fetch.on_write_failed(OSError(5, "Input/output error"))  # the fsync
    assert fetch.state is State.COMMIT_FAILED and not fetch.failed
    assert fetch.readable() == 10
