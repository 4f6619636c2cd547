"""What is being fetched and read right now: the one owner of that knowledge.

Blobs are content-addressed, so this is shared by the caches of every upstream: a
fetch in flight for a digest is joined whichever upstream a client asked through, and
the reaper asks ``in_use`` before it removes anything. Keys are ``Digest``s.

``InFlight`` is a typing ``Protocol`` rather than a zope interface, like the other
seams between layers (``regmirror.expiry.usage.Usage``, ``regmirror.mirror.freshness
.TagFreshness``): mypy checks every implementation and fake structurally where it is
used (no ``implementer`` declaration to forget or to get wrong), and the seam costs
nothing at run time. ``tests/unit/test_inflight.py`` compares the signatures of
``LocalInFlight`` and ``regmirror.testing.FakeInFlight`` with the Protocol's.

``LocalInFlight`` is the single-process implementation. The methods are shaped for one
on Redis (a cluster): starting or joining a fetch is asynchronous (a lease to take) and
hands the starter a ``FetchLease`` to report the fetch's start and end on (a lease to
hold and renew, then to give back); everything the request path or the reaper asks
synchronously (``fetch``, ``active``, ``reading``, ``in_use``) can be answered from a
local view that such an implementation keeps up to date.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal, Protocol, runtime_checkable

import attrs
from twisted.internet.defer import DeferredSemaphore

from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import BlobFetch, DigestMismatch, FetchView, State
from regmirror.fetch.heap import trim_heap
from regmirror.fetch.singleflight import SingleFlight
from regmirror.storage.store import is_disk_full

FailureReason = Literal["digest", "disk", "upstream"]
TRIM_AFTER = 4 * 1024 * 1024  # a fetch this large leaves free heap worth giving back
Release = Callable[[], None]


@attrs.frozen
class FetchProgress:
    """One fetch in flight, for a status page: bytes received of ``size`` (None when
    the upstream did not say), the clients reading it now, and where it comes from
    since when (``BlobFetch.upstream``, ``.repository``, ``.started``)."""

    digest: Digest
    received: int
    size: int | None
    readers: int
    upstream: str = ""
    repository: str = ""
    started: float = 0.0

    @classmethod
    def of(cls, fetch: BlobFetch, readers: int) -> FetchProgress:
        return cls(
            fetch.digest,
            fetch.received,
            fetch.size,
            readers,
            fetch.upstream,
            fetch.repository,
            fetch.started,
        )


@runtime_checkable
class FetchLease(Protocol):
    """The right to run one fetch, given to whoever starts it."""

    def started(self, fetch: BlobFetch) -> None:
        """The fetch exists: from now on readers join it. Call before its body flows."""

    def ended(self, fetch: BlobFetch) -> None:
        """The fetch ended, committed or not (call it from its ``on_done``): it is no
        longer in flight, its slot is free and a failure is counted."""


StartFetch = Callable[[FetchLease], Awaitable[BlobFetch]]


@runtime_checkable
class InFlight(Protocol):
    def fetch(self, digest: Digest) -> FetchView | None:
        """The fetch of ``digest`` in flight, if any."""

    def active(self, digest: Digest) -> bool:
        """A fetch of ``digest`` is in flight or being started: a request would join."""

    async def join_or_start(self, digest: Digest, start: StartFetch) -> FetchView:
        """The fetch in flight for ``digest``, or the one ``start`` begins: one at a time
        per digest (concurrent callers share one ``start``), each holding one of the
        fetch slots (``regmirror.max_upstream_fetches``) until it ends. What ``start``
        raises reaches every caller; the next call starts over."""

    def reading(self, digest: Digest) -> Release:
        """Count a reader of ``digest`` until the returned function is called (once or
        more)."""

    def in_use(self, digest: Digest) -> bool:
        """Being read or fetched: the reaper leaves it alone."""

    def failures(self) -> Mapping[FailureReason, int]:
        """Fetches that ended without committing, by reason (``digest``: wrong bytes,
        discarded)."""

    def count(self) -> int:
        """Fetches in flight."""

    def readers(self) -> int:
        """Clients reading blobs now."""

    def fetches(self) -> list[FetchProgress]:
        """The fetches in flight, with their progress."""


def failure_reason(fetch: BlobFetch) -> FailureReason | None:
    """Why a fetch that ended did not commit (None: it did)."""
    if fetch.state is State.COMMITTED:
        return None
    if isinstance(fetch.error, DigestMismatch):
        return "digest"
    if fetch.error is not None and is_disk_full(fetch.error):
        return "disk"
    return "upstream"


class LocalInFlight:
    """``InFlight`` in one process. ``max_fetches`` bounds the fetches running at once
    (0: no limit)."""

    def __init__(self, max_fetches: int = 0) -> None:
        self._slots = DeferredSemaphore(max_fetches) if max_fetches > 0 else None
        self._fetches: dict[Digest, BlobFetch] = {}
        self._starting: SingleFlight[FetchView] = SingleFlight()
        self._readers: Counter[Digest] = Counter()
        self._failures: Counter[FailureReason] = Counter()
        self._trim_due = False

    def fetch(self, digest: Digest) -> FetchView | None:
        return self._fetches.get(digest)

    def active(self, digest: Digest) -> bool:
        return digest in self._fetches or digest in self._starting

    async def join_or_start(self, digest: Digest, start: StartFetch) -> FetchView:
        fetch = self._fetches.get(digest)
        if fetch is not None:
            return fetch
        return await self._starting.run(digest, lambda: self._start(start))

    async def _start(self, start: StartFetch) -> FetchView:
        if self._slots is not None:
            await self._slots.acquire()  # regmirror.max_upstream_fetches: wait for a slot
        lease = _LocalLease(self)
        try:
            return await start(lease)
        except BaseException:
            lease.give_back()
            raise

    def reading(self, digest: Digest) -> Release:
        self._readers[digest] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._readers[digest] -= 1
                if self._readers[digest] <= 0:
                    del self._readers[digest]

        return release

    def in_use(self, digest: Digest) -> bool:
        return digest in self._readers or digest in self._fetches

    def failures(self) -> Mapping[FailureReason, int]:
        return self._failures

    def count(self) -> int:
        return len(self._fetches)

    def readers(self) -> int:
        return sum(self._readers.values())

    def fetches(self) -> list[FetchProgress]:
        return [
            FetchProgress.of(fetch, self._readers.get(digest, 0))
            for digest, fetch in self._fetches.items()
        ]

    # -- what a lease does -----------------------------------------------------------

    def _started(self, fetch: BlobFetch) -> None:
        self._fetches[fetch.digest] = fetch

    def _ended(self, fetch: BlobFetch) -> None:
        if self._fetches.get(fetch.digest) is fetch:
            del self._fetches[fetch.digest]
        reason = failure_reason(fetch)
        if reason is not None:
            self._failures[reason] += 1
        self._trim_due = self._trim_due or fetch.received >= TRIM_AFTER
        if self._trim_due and not self._fetches:
            # The chunks of the large fetches that ran: back to the system, not kept in
            # RSS (not after every small one: nothing to give back).
            self._trim_due = False
            trim_heap()

    def _free_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()


class _LocalLease:
    """A fetch slot, held from ``join_or_start`` until the fetch ended (or ``start``
    failed): given back once."""

    def __init__(self, owner: LocalInFlight) -> None:
        self._owner = owner
        self._held = True

    def started(self, fetch: BlobFetch) -> None:
        self._owner._started(fetch)

    def ended(self, fetch: BlobFetch) -> None:
        self.give_back()
        self._owner._ended(fetch)

    def give_back(self) -> None:
        if self._held:
            self._held = False
            self._owner._free_slot()
