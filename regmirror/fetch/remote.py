"""A fetch that another replica of the cluster runs, followed here on the shared store.

The replica holding the digest's lease downloads into its own temporary file
(``ROOT/_tmp/<replica>/...``) and publishes its progress through Redis (bytes written and
hashed, then verified, committed or failed: ``regmirror.fetch.redisinflight``). A
``RemoteFetch`` is what this replica's readers follow meanwhile (a ``FetchView``, as a
local ``BlobFetch`` is): they read the other replica's temporary file as it grows, up to
what was published as written, and never the last byte before the holder said the
digest matched, or the verified file appeared in the store under its digest (only
verified content is ever committed there). A reader that opens it after the commit
reads the committed file.

What it knows comes from ``update`` (a published progress report, or one read back from
Redis by a periodic look) and from ``look_on_disk``, which the owner calls when Redis
cannot be asked: the temporary file's size (written bytes, never the last one before the
commit) and the committed file. It fails, and its readers abort, when the holder
failed, when its lease ended without a commit (the holder died), or when nothing moved
for ``stall`` seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import FetchFailed, FetchReaders, State
from regmirror.logs import get_logger
from regmirror.storage.store import Store

log = get_logger()


@attrs.frozen
class Progress:
    """One progress report of a fetch (as published): ``size`` None while unknown."""

    state: State
    written: int
    hashed: int
    size: int | None

    def encode(self) -> str:
        size = -1 if self.size is None else self.size
        return f"{self.state.name} {self.written} {self.hashed} {size}"

    @classmethod
    def decode(cls, text: str) -> Progress:
        state, written, hashed, size = text.split()
        return cls(State[state], int(written), int(hashed), None if size == "-1" else int(size))


class HolderGone(FetchFailed):
    """The replica running the fetch stopped before committing it."""


class RemoteFetch(FetchReaders):
    """The readers' side of a fetch run by ``holder`` into ``path`` (shared store)."""

    def __init__(
        self, store: Store, digest: Digest, holder: str, path: Path, progress: Progress
    ) -> None:
        super().__init__()
        self._store = store
        self.digest = digest
        self.holder = holder
        self.path = path
        self.size = progress.size
        self.written = 0
        self.received = 0
        self.state = State.RUNNING
        self.error: BaseException | None = None
        self.moved = 0.0  # when it last moved (the owner's clock), for the stall check
        self._inode = _inode(path)  # the file followed, while the holder writes it
        self.update(progress)

    # -- what the owner tells it -----------------------------------------------------

    def update(self, progress: Progress, now: float | None = None) -> None:
        """A progress report of the holder (reports may arrive out of order)."""
        if self.state in (State.FAILED, State.COMMITTED):
            return
        if progress.size is not None:
            self.size = progress.size
        moved = progress.written > self.written
        self.written = max(self.written, progress.written)
        self.received = self.written
        if progress.state is State.FAILED:
            self.fail(FetchFailed(f"the fetch on replica {self.holder} failed"))
            return
        if progress.state in (State.VERIFIED, State.COMMIT_FAILED) and not self.verified:
            self.state = State.VERIFIED
            moved = True
        if progress.state is State.COMMITTED:
            self._commit()
            return
        if moved:
            if now is not None:
                self.moved = now
            self._notify()

    def look_on_disk(self, now: float) -> None:
        """Learn what the files say (Redis cannot be asked): how much the temporary file
        holds, and whether the verified file is in the store."""
        if self.state in (State.FAILED, State.COMMITTED):
            return
        if self._in_store():
            self._commit()
            return
        try:
            on_disk = os.stat(self.path).st_size
        except FileNotFoundError:
            return  # renamed (the store shows it next time) or discarded (the lease says)
        if on_disk > self.written:
            self.written = self.received = on_disk
            self.moved = now
            self._notify()

    def holder_gone(self) -> None:
        """The holder's lease ended and the store has no verified file: it died."""
        if self._in_store():
            self._commit()
            return
        self.fail(HolderGone(f"replica {self.holder} stopped fetching {self.digest}"))

    def _in_store(self) -> bool:
        """The store shows the verified file and the readers can have all of it: it is
        the file followed (the holder renamed it), or the holder said the digest matched
        (the file followed holds every byte). Another replica's copy committed meanwhile
        (one that fetched alone, cut off from Redis) does not count while the holder's
        file is partial: its readers read that file, and would come up short."""
        if self.size is None:
            return False
        committed = _inode(self._store.blob_path(self.digest), self.size)
        if committed is None:
            return False
        return self.verified or self._inode is None or committed == self._inode

    def fail(self, error: BaseException) -> None:
        if self.state in (State.FAILED, State.COMMITTED):
            return
        # Verified before and written in full: the bytes on disk are right; readers
        # may finish. Otherwise they must abort.
        self.state = self._state_after_failure()
        self.error = error
        log.warn("{digest}: {error}", digest=str(self.digest), error=str(error))
        self._notify()
        self._resolve()

    def _commit(self) -> None:
        self.state = State.COMMITTED
        if self.size is not None:
            self.written = self.received = self.size
        self._notify()
        self._resolve()


def _inode(path: Path, size: int | None = None) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` (of ``size`` bytes if given), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if size is not None and st.st_size != size:
        return None
    return st.st_dev, st.st_ino
