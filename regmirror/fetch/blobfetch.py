"""One upstream download of a blob, shared by every client that asks for it.

The bytes are appended to a temporary file and hashed as they arrive, by a
``DiskWriter`` (``regmirror.fetch.writers``). Readers follow the growing file at their
own pace, reading only what is on disk (``regmirror.api.senders``: ``os.sendfile`` to a
plain TCP client, ``pread`` otherwise), so a slow reader never slows the download or the
other readers, and memory stays bounded whatever the number of readers: the fetch holds
what the writer has not written yet, and when that passes ``HIGH_WATER`` the upstream
connection is paused.

The last byte is withheld from readers until the digest matched: a reader can never
receive a complete body that was not verified. On a mismatch (or any failure) readers
are told and abort their connections. A verified file is fsynced (by the writer, off
the reactor thread) and renamed into the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer

from regmirror.domain.digest import Digest
from regmirror.fetch.writers import InlineWriter, WriterFactory
from regmirror.logs import get_logger
from regmirror.storage.store import Store, is_disk_full

log = get_logger()

# Pause the upstream when this much has arrived but is not on disk yet; resume below LOW.
# Six 1 MiB reads in flight absorb the writer threads' scheduling delays; each more MiB
# is a MiB of RSS per fetch (the peak of a cold 256 MiB GET: ~12 MB above idle at 8).
HIGH_WATER = 6 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024


class State(Enum):
    RUNNING = "running"
    VERIFIED = "verified"  # every byte arrived and the digest matched
    COMMITTED = "committed"  # renamed into the store
    FAILED = "failed"  # before it was verified: readers must abort
    COMMIT_FAILED = "commit failed"  # verified, then not committed: readers may finish


class FetchFailed(Exception):
    pass


class DigestMismatch(FetchFailed):
    pass


class Follower(Protocol):
    """A reader of a fetch in flight (``regmirror.api.senders``)."""

    def fetch_changed(self) -> None:
        """More is on disk, or the fetch was verified, or it failed."""


class FetchView(Protocol):
    """What the readers of a fetch in flight see of it, wherever it runs: a
    ``BlobFetch`` of this process, or in a cluster a ``RemoteFetch``
    (``regmirror.fetch.remote``) that another replica runs into the shared store."""

    digest: Digest
    size: int | None
    received: int
    state: State

    @property
    def verified(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def sendable(self) -> int: ...

    def readable(self) -> int: ...

    def follow(self, follower: Follower) -> None: ...

    def unfollow(self, follower: Follower) -> None: ...

    def when_committed(self) -> Deferred[None]: ...

    def open_reader(self) -> int: ...


class FetchReaders:
    """What a fetch in flight shows its readers, wherever it runs (``BlobFetch`` here,
    ``regmirror.fetch.remote.RemoteFetch`` on another replica): how far they may read
    (never the last byte before the digest matched), who follows it, who waits for
    its commit. A subclass sets ``digest``, ``size``, ``path``, ``written``, ``state``,
    ``error`` and calls ``_notify`` when they change, ``_resolve`` once it is done."""

    _store: Store
    digest: Digest
    size: int | None
    path: Path
    written: int
    state: State
    error: BaseException | None

    def __init__(self) -> None:
        self._followers: list[Follower] = []
        self._committed: list[Deferred[None]] = []

    @property
    def verified(self) -> bool:
        """Every byte arrived and the digest matched (whatever happened after)."""
        return self.state in (State.VERIFIED, State.COMMITTED, State.COMMIT_FAILED)

    @property
    def failed(self) -> bool:
        """Readers must abort: the content was never verified and never will be."""
        return self.state is State.FAILED

    @property
    def done(self) -> bool:
        """Nothing will change any more."""
        return self.state in (State.FAILED, State.COMMITTED, State.COMMIT_FAILED)

    def sendable(self) -> int:
        """Bytes a reader may send: everything once verified, never the last byte
        before."""
        if self.verified and self.size is not None:
            return self.size
        if self.state is State.FAILED or self.size is None:
            return 0
        return self.size - 1

    def readable(self) -> int:
        """Bytes a reader may read from the file now: what is on disk, within
        ``sendable``."""
        return min(self.written, self.sendable())

    def _state_after_failure(self) -> State:
        """``COMMIT_FAILED`` (readers may finish) only when the digest matched and the
        file holds every byte; a write that failed after the hash matched (a full
        disk) leaves readers waiting for bytes that will never come: ``FAILED``."""
        if self.verified and self.size is not None and self.written >= self.size:
            return State.COMMIT_FAILED
        return State.FAILED

    def follow(self, follower: Follower) -> None:
        self._followers.append(follower)

    def unfollow(self, follower: Follower) -> None:
        try:
            self._followers.remove(follower)
        except ValueError:
            pass

    def when_committed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.state is State.COMMITTED:
            d.callback(None)
        elif self.done:
            d.errback(self.error or FetchFailed("failed"))
        else:
            self._committed.append(d)
        return d

    def open_reader(self) -> int:
        """A read-only descriptor of the temporary file (valid after rename, too)."""
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return os.open(self._store.blob_path(self.digest), os.O_RDONLY | os.O_CLOEXEC)

    def _notify(self) -> None:
        for follower in list(self._followers):
            try:
                follower.fetch_changed()
            except Exception:
                log.failure("a blob reader failed")

    def _resolve(self) -> None:
        """Answer those waiting for the commit (the fetch is done)."""
        waiters, self._committed = self._committed, []
        for d in waiters:
            if self.state is State.COMMITTED:
                d.callback(None)
            else:
                d.errback(self.error or FetchFailed("failed"))


class BlobFetch(FetchReaders):
    """The temporary file of a blob being downloaded, with its readers' bookkeeping.

    The network side calls ``write`` and ``finish``/``fail``; readers call
    ``readable`` to learn how far they may read, and ``follow`` it to be told
    (``Follower.fetch_changed``) as that changes.
    ``upstream``, ``repository`` and ``started`` (the clock's seconds) say where it
    comes from and since when, for the status page.
    """

    def __init__(
        self,
        store: Store,
        digest: Digest,
        size: int | None,
        *,
        fsync: bool = True,
        writer: WriterFactory = InlineWriter,
        on_done: Callable[[BlobFetch], None] | None = None,
        upstream: str = "",
        repository: str = "",
        started: float = 0.0,
    ) -> None:
        super().__init__()
        self._store = store
        self.digest = digest
        self.size = size
        self.upstream = upstream
        self.repository = repository
        self.started = started
        self._on_done = on_done
        temp = store.new_temp()
        self.path = temp.path
        self.received = 0
        self.written = 0
        self.hashed = 0
        self.state = State.RUNNING
        self.error: BaseException | None = None
        self._producer: IPushProducer | None = None
        self._paused = False
        self._writer = writer(temp.fd, digest.hasher(), size, fsync, self)

    # -- the network side ------------------------------------------------------------

    def attach(self, producer: IPushProducer) -> None:
        """The upstream connection, paused while the disk writer falls behind."""
        self._producer = producer

    def write(self, data: bytes) -> None:
        if self.state is not State.RUNNING:
            return
        if self.size is not None and self.received + len(data) > self.size:
            self.fail(FetchFailed(f"upstream sent more than the {self.size} bytes announced"))
            return
        self.received += len(data)
        self._writer.put(data)
        if (
            not self._paused
            and self._producer is not None
            and self.received - self._behind() > HIGH_WATER
        ):
            self._paused = True
            self._producer.pauseProducing()

    def finish(self) -> None:
        """The upstream body ended cleanly."""
        if self.state is not State.RUNNING:
            return
        if self.size is None:
            self._writer.end()
        elif self.received < self.size:
            self.fail(
                FetchFailed(f"upstream body ended after {self.received} of {self.size} bytes")
            )

    def fail(self, error: BaseException) -> None:
        if self.state in (State.FAILED, State.COMMIT_FAILED, State.COMMITTED):
            return
        self.state = self._state_after_failure()
        was_verified = self.state is State.COMMIT_FAILED
        self.error = error
        if isinstance(error, DigestMismatch):
            log.error("{digest}: {error}; discarded", digest=str(self.digest), error=str(error))
        elif is_disk_full(error):
            log.error("{digest}: disk full while writing; discarded", digest=str(self.digest))
        elif was_verified:
            log.error("{digest}: cannot commit: {error}", digest=str(self.digest), error=error)
        else:
            log.warn("{digest}: fetch failed: {error}", digest=str(self.digest), error=error)
        self._writer.abort()
        self._store.discard(self.path)
        self._notify()
        self._done()

    # -- the writer's reports (WriterEvents) -----------------------------------------

    def on_progress(self, written: int, hashed: int) -> None:
        if self.state not in (State.RUNNING, State.VERIFIED):
            return
        self.written = written
        self.hashed = max(self.hashed, hashed)
        if (
            self._paused
            and self._producer is not None
            and self.received - self._behind() < LOW_WATER
        ):
            self._paused = False
            self._producer.resumeProducing()
        self._notify()

    def _behind(self) -> int:
        """The bytes that both the disk and the hash have."""
        return (
            self.size if self.verified and self.size is not None else min(self.written, self.hashed)
        )

    def on_hashed(self, total: int, hexdigest: str) -> None:
        if self.state is not State.RUNNING:
            return
        if hexdigest != self.digest.hex:
            self.fail(DigestMismatch(f"upstream sent content with digest sha256:{hexdigest}"))
            return
        self.size = total
        self.hashed = total
        self.state = State.VERIFIED
        self._notify()
        self._writer.sync()

    def on_synced(self) -> None:
        if self.state is not State.VERIFIED:
            return
        try:
            self._store.commit(self.path, self.digest)
        except OSError as e:
            self.fail(e)
            return
        self.state = State.COMMITTED
        self._done()

    def on_write_failed(self, error: BaseException) -> None:
        self.fail(error)

    def _done(self) -> None:
        if self._on_done is not None:
            self._on_done(self)
        self._resolve()
