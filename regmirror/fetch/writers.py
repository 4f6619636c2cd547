"""Disk writers of a fetch: append a blob's bytes to its temporary file and hash them.

In production a thread per fetch (``ThreadedWriter``: ``os.write`` and sha256 release
the GIL, so the reactor keeps moving bytes while the other core hashes), in unit tests
inline (``InlineWriter``). A writer reports to its ``WriterEvents`` (the
``BlobFetch``), always on the reactor thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from regmirror.reactor import Reactor


class WriterEvents(Protocol):
    """What a writer reports, always on the reactor thread."""

    def on_progress(self, written: int, hashed: int) -> None: ...
    def on_hashed(self, total: int, hexdigest: str) -> None: ...
    def on_synced(self) -> None: ...
    def on_write_failed(self, error: BaseException) -> None: ...


class DiskWriter(Protocol):
    def put(self, data: bytes) -> None: ...
    def end(self) -> None: ...
    def sync(self) -> None: ...
    def abort(self) -> None: ...


WriterFactory = Callable[[int, Any, "int | None", bool, WriterEvents], DiskWriter]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class InlineWriter:
    """Writes and hashes in the caller's thread (unit tests; tiny blobs)."""

    def __init__(
        self, fd: int, hasher: Any, size: int | None, fsync: bool, events: WriterEvents
    ) -> None:
        self._fd: int | None = fd
        self._hasher = hasher
        self._size = size
        self._fsync = fsync
        self._events = events
        self._total = 0

    def put(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            _write_all(self._fd, data)
        except OSError as e:
            self._close()
            self._events.on_write_failed(e)
            return
        self._hasher.update(data)
        self._total += len(data)
        self._events.on_progress(self._total, self._total)
        if self._total == self._size:
            self._events.on_hashed(self._total, self._hasher.hexdigest())

    def end(self) -> None:
        if self._size is None:
            self._events.on_hashed(self._total, self._hasher.hexdigest())

    def sync(self) -> None:
        try:
            if self._fsync and self._fd is not None:
                os.fsync(self._fd)
        except OSError as e:
            self._close()
            self._events.on_write_failed(e)
            return
        self._close()
        self._events.on_synced()

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_END, _SYNC, _ABORT = object(), object(), object()


class ThreadedWriter:
    """Hashes in one thread and writes (then fsyncs) in another, so that verification
    never waits for the disk; reports to the reactor with ``callFromThread``,
    coalescing progress reports."""

    def __init__(
        self,
        reactor: Reactor,
        fd: int,
        hasher: Any,
        size: int | None,
        fsync: bool,
        events: WriterEvents,
    ) -> None:
        self._call = reactor.callFromThread
        self._fd = fd
        self._hasher = hasher
        self._size = size
        self._fsync = fsync
        self._events = events
        self._hash_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._write_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._written = 0
        self._hashed = 0
        self._report_pending = False
        for target, name in ((self._hash, "hash"), (self._write, "write")):
            threading.Thread(target=target, name=f"regmirror-{name}", daemon=True).start()

    def put(self, data: bytes) -> None:
        self._hash_queue.put(data)
        self._write_queue.put(data)

    def end(self) -> None:
        self._hash_queue.put(_END)

    def sync(self) -> None:
        self._hash_queue.put(_ABORT)
        self._write_queue.put(_SYNC)

    def abort(self) -> None:
        self._hash_queue.put(_ABORT)
        self._write_queue.put(_ABORT)

    def _hash(self) -> None:
        total, size, hasher, get = 0, self._size, self._hasher, self._hash_queue.get
        while True:
            item = get()
            if item is _ABORT:
                return
            if item is _END:
                self._call(self._events.on_hashed, total, hasher.hexdigest())
                continue
            hasher.update(item)
            total += len(item)
            with self._lock:
                self._hashed = total
                pending, self._report_pending = self._report_pending, True
            if not pending:
                self._call(self._report)
            if total == size:
                self._call(self._events.on_hashed, total, hasher.hexdigest())

    def _report(self) -> None:
        with self._lock:
            self._report_pending = False
            written, hashed = self._written, self._hashed
        self._events.on_progress(written, hashed)

    def _write(self) -> None:
        fd, get = self._fd, self._write_queue.get
        try:
            while True:
                item = get()
                if item is _ABORT:
                    return
                if item is _SYNC:
                    if self._fsync:
                        os.fsync(fd)
                    os.close(fd)
                    fd = -1
                    self._call(self._events.on_synced)
                    return
                _write_all(fd, item)
                with self._lock:
                    self._written += len(item)
                    pending, self._report_pending = self._report_pending, True
                if not pending:
                    self._call(self._report)
        except OSError as e:
            self._call(self._events.on_write_failed, e)
        finally:
            if fd >= 0:
                os.close(fd)


def threaded_writers(reactor: Reactor) -> WriterFactory:
    def factory(
        fd: int, hasher: Any, size: int | None, fsync: bool, events: WriterEvents
    ) -> DiskWriter:
        return ThreadedWriter(reactor, fd, hasher, size, fsync, events)

    return factory
