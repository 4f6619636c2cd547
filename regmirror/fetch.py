"""One upstream download of a blob, shared by every client that asks for it.

The bytes are hashed and appended to a temporary file as they arrive; readers follow the
growing file at their own pace (``regmirror.web.BlobSender``), so a slow reader never
slows the download or the other readers, and memory stays bounded. The last byte is
withheld from readers until the digest matched: a reader can never receive a complete
body that was not verified. On a mismatch (or any failure) readers are told and abort
their connections. A verified file is fsynced (in a thread) and renamed into the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from regmirror.digest import Digest
from regmirror.logs import get_logger
from regmirror.store import Store, is_disk_full

log = get_logger()


class State(Enum):
    RUNNING = "running"
    VERIFIED = "verified"  # every byte arrived and the digest matched
    COMMITTED = "committed"  # renamed into the store
    FAILED = "failed"


class FetchFailed(Exception):
    pass


class DigestMismatch(FetchFailed):
    pass


Listener = Callable[[], None]


class BlobFetch:
    """The temporary file of a blob being downloaded, with its readers' bookkeeping.

    The network side calls ``write`` and ``finish``/``fail``; readers call
    ``readable`` to learn how far they may read and ``wait`` to be called back once
    when that changes.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        store: Store,
        digest: Digest,
        size: int | None,
        *,
        fsync: bool = True,
        on_done: Callable[[BlobFetch], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self.digest = digest
        self.size = size
        self._fsync = fsync
        self._on_done = on_done
        temp = store.new_temp()
        self._fd: int | None = temp.fd
        self.path = temp.path
        self._hasher = digest.hasher()
        self.written = 0
        self.state = State.RUNNING
        self.verified = False
        self.error: BaseException | None = None
        self._listeners: list[Listener] = []
        self._committed: list[Deferred[None]] = []

    # -- the network side ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.state is not State.RUNNING:
            return
        if self.size is not None and self.written + len(data) > self.size:
            self.fail(FetchFailed(f"upstream sent more than the {self.size} bytes announced"))
            return
        fd = self._fd
        assert fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            self.fail(e)
            return
        self._hasher.update(data)
        self.written += len(data)
        if self.written == self.size:
            self._verify()
        else:
            self._notify()

    def finish(self) -> None:
        """The upstream body ended cleanly."""
        if self.state is State.RUNNING and self.size is None:
            self.size = self.written
            self._verify()
        elif self.state is State.RUNNING:
            self.fail(FetchFailed(f"upstream body ended after {self.written} of {self.size} bytes"))

    def fail(self, error: BaseException) -> None:
        if self.state in (State.FAILED, State.COMMITTED):
            return
        self.state = State.FAILED
        self.error = error
        if isinstance(error, DigestMismatch):
            log.error("{digest}: {error}; discarded", digest=str(self.digest), error=str(error))
        elif is_disk_full(error):
            log.error("{digest}: disk full while writing; discarded", digest=str(self.digest))
        else:
            log.warn("{digest}: fetch failed: {error}", digest=str(self.digest), error=error)
        self._close()
        self._store.discard(self.path)
        self._notify()
        self._done()

    def _verify(self) -> None:
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            self.fail(DigestMismatch(f"upstream sent content with digest {actual}"))
            return
        self.state = State.VERIFIED
        self.verified = True
        self._notify()
        fd = self._fd
        assert fd is not None
        d = (
            deferToThreadPool(self._reactor, self._reactor.getThreadPool(), os.fsync, fd)
            if self._fsync
            else Deferred.fromCoroutine(_nothing())
        )
        d.addCallback(lambda _: self._commit())
        d.addErrback(self._commit_failed)

    def _commit(self) -> None:
        self._close()
        self._store.commit(self.path, self.digest)
        self.state = State.COMMITTED
        self._done()

    def _commit_failed(self, failure: Failure) -> None:
        # Readers already have everything they need from the open temporary file.
        log.failure("{digest}: cannot commit", failure, digest=str(self.digest))
        self._close()
        self._store.discard(self.path)
        self.state = State.FAILED
        self.error = failure.value
        self._done()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _done(self) -> None:
        if self._on_done is not None:
            self._on_done(self)
        waiters, self._committed = self._committed, []
        for d in waiters:
            if self.state is State.COMMITTED:
                d.callback(None)
            else:
                d.errback(self.error or FetchFailed("failed"))

    # -- the readers' side -----------------------------------------------------------

    @property
    def failed(self) -> bool:
        """Readers must abort: the content was never verified and never will be."""
        return self.state is State.FAILED and not self.verified

    def readable(self) -> int:
        """How many bytes readers may read now: all that was written once verified,
        and never the last byte before."""
        if self.verified:
            return self.written
        if self.state is State.FAILED or self.size is None:
            return 0
        return min(self.written, self.size - 1)

    def wait(self, listener: Listener) -> None:
        """Call ``listener`` once, at the next change (more bytes, verified, failed)."""
        self._listeners.append(listener)

    def unwait(self, listener: Listener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def when_committed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.state is State.COMMITTED:
            d.callback(None)
        elif self.state is State.FAILED:
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
        if not self._listeners:
            return
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            try:
                listener()
            except Exception:
                log.failure("a blob reader failed")


async def _nothing() -> None:
    return None
