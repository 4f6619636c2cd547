"""Blobs: from disk, from the fetch in flight, or fetched upstream once for everyone.

``Blobs.blob`` answers with a ``BlobSource`` (``regmirror.mirror.sources``). A miss
joins the fetch of that digest in flight, or starts one (``InFlight.join_or_start``:
one per digest, within the fetch slots); the fetch hashes and writes the body as it
arrives (``regmirror.fetch``) while its readers follow the temporary file. A blob that
cannot fit in the quota even after eviction is passed through to its one client,
verified on the way, and not cached.
"""

from __future__ import annotations

from collections import Counter

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.errors import Unavailable
from regmirror.domain.events import RecentErrors
from regmirror.domain.kinds import Kind
from regmirror.expiry.usage import Usage
from regmirror.fetch.blobfetch import BlobFetch, State
from regmirror.fetch.body import BlobBody, TuneTransport
from regmirror.fetch.inflight import FetchLease, InFlight, failure_reason
from regmirror.fetch.writers import WriterFactory
from regmirror.logs import get_logger
from regmirror.mirror.sources import BlobSource, CommittedBlob, FollowedFetch, PassThrough
from regmirror.mirror.visibility import Visibility
from regmirror.reactor import ReactorTime
from regmirror.storage.store import Store
from regmirror.upstream.remote import RemoteRegistry

log = get_logger()


class _TooBig(Exception):
    """The blob cannot be cached (``why``: the quota, or the disk): pass it through."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class Blobs:
    """The blobs of one upstream's repositories (the bytes are shared by all). A fetch
    that ends without committing is recorded in ``errors``; ``stats`` counts, besides
    requests, ``blob_bytes_fetched``: body bytes received from the upstream (a fetch's
    when it ends, a pass-through's size when it starts)."""

    def __init__(
        self,
        clock: ReactorTime,
        store: Store,
        remote: RemoteRegistry,
        visibility: Visibility,
        inflight: InFlight,
        usage: Usage,
        stats: Counter[str],
        *,
        fsync: bool,
        writer: WriterFactory,
        tune_transport: TuneTransport,
        errors: RecentErrors,
    ) -> None:
        self._clock = clock
        self._store = store
        self._remote = remote
        self._visibility = visibility
        self._inflight = inflight
        self._usage = usage
        self._stats = stats
        self._fsync = fsync
        self._writer = writer
        self._tune_transport = tune_transport
        self._errors = errors

    async def blob(self, name: str, digest: Digest) -> BlobSource:
        """The blob from disk, or the fetch in flight that is downloading it (with a
        descriptor of its temporary file), or, for a blob that cannot fit in the quota,
        an upstream response to pass through. Call the ``release`` given when done."""
        repository = self._remote.repository(name)
        await self._visibility.check_reference(repository, digest, Kind.BLOB)
        cached = self._open_cached(digest)
        if cached is not None:
            self._stats["blob_hits"] += 1
            return cached
        if self._inflight.active(digest):
            self._stats["blob_joins"] += 1
        try:
            fetch = await self._inflight.join_or_start(
                digest, lambda lease: self._start(repository, digest, lease)
            )
        except _TooBig as e:
            return await self._pass_through(repository, digest, e.why)
        if fetch.size is not None and not fetch.failed:
            try:
                fd = fetch.open_reader()
            except FileNotFoundError:
                pass  # committed, or failed, in the meantime
            else:
                return FollowedFetch(fetch, fd, fetch.size, self._inflight.reading(digest))
        if fetch.state is not State.COMMITTED and not fetch.failed:
            # The upstream did not say how long the blob is: serve it once verified.
            await fetch.when_committed()
        cached = self._open_cached(digest)
        if cached is None:
            raise Unavailable(
                "the upstream did not deliver the blob intact; try again",
                {"digest": str(digest)},
            )
        return attrs.evolve(cached, fetched=True)

    async def blob_size(self, name: str, digest: Digest) -> int:
        """For ``HEAD``: the size of a blob, asking upstream (without fetching) on a miss."""
        repository = self._remote.repository(name)
        await self._visibility.check_reference(repository, digest, Kind.BLOB)
        size = self._store.blob_size(digest)
        if size is not None:
            return size
        fetch = self._inflight.fetch(digest)
        if fetch is not None and fetch.size is not None:
            return fetch.size
        return await self._remote.blob_size(repository, digest)

    def _open_cached(self, digest: Digest) -> CommittedBlob | None:
        opened = self._store.open_blob(digest)
        if opened is None:
            return None
        self._usage.used(digest)
        return CommittedBlob(*opened, release=self._inflight.reading(digest))

    async def _pass_through(self, repository: str, digest: Digest, why: str) -> PassThrough:
        got = await self._remote.get_blob(repository, digest)
        if got.size is None:
            await got.discard()
            raise Unavailable("the upstream sent no blob size", {"digest": str(digest)})
        log.warn(
            "blob {digest} ({size} bytes) {why}: passed through",
            digest=str(digest),
            size=got.size,
            why=why,
        )
        self._stats["blob_bytes_fetched"] += got.size
        return PassThrough(got.response, digest, got.size)

    # -- the fetch lifecycle ---------------------------------------------------------

    async def _start(self, repository: str, digest: Digest, lease: FetchLease) -> BlobFetch:
        got = await self._remote.get_blob(repository, digest)
        if not self._usage.reserve(digest, got.size or 0):
            await got.discard()
            raise _TooBig("does not fit in the cache quota")
        if got.size is not None and not self._store.has_room(got.size):
            # The disk is full of something else than our quota: streaming into it
            # would break the client's transfer; pass the blob through instead.
            self._usage.release(digest)
            await got.discard()
            log.error(
                "blob {digest} ({size} bytes): no room left on the store's disk",
                digest=str(digest),
                size=got.size,
            )
            self._usage.evict()
            raise _TooBig("finds no room left on the store's disk")
        fetch = BlobFetch(
            self._store,
            digest,
            got.size,
            fsync=self._fsync,
            writer=self._writer,
            on_done=lambda f: self._done(f, repository, lease),
            upstream=self._remote.name,
            repository=repository,
            started=self._clock.seconds(),
        )
        lease.started(fetch)
        self._stats["blob_fetches"] += 1
        log.info(
            "blob {digest} from {upstream} ({size} bytes)",
            digest=str(digest),
            upstream=self._remote.name,
            size=got.size,
        )
        got.response.deliverBody(
            BlobBody(fetch, self._clock, self._remote.read_timeout, self._tune_transport)
        )
        return fetch

    def _done(self, fetch: BlobFetch, repository: str, lease: FetchLease) -> None:
        lease.ended(fetch)
        self._usage.release(fetch.digest)
        self._stats["blob_bytes_fetched"] += fetch.received
        reason = failure_reason(fetch)
        if reason is not None:
            self._errors.record(
                reason,
                f"{repository}: {fetch.error}",
                upstream=self._remote.name,
                digest=str(fetch.digest),
            )
        if fetch.state is State.COMMITTED:
            self._visibility.link(repository, fetch.digest, Kind.BLOB)
            self._usage.added(Kind.BLOB, fetch.digest, fetch.size or 0)
            log.info("blob {digest} cached", digest=str(fetch.digest))
        elif reason == "disk":
            self._usage.evict()
