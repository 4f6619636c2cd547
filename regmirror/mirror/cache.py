"""The mirror of one upstream: what the API asks it, answered by the rooms behind it.

``Cache`` is a façade over ``Blobs`` (``regmirror.mirror.blobs``), ``Manifests``
(``.manifests``), ``Tags`` (``.tags``), ``Referrers`` (``.referrers``) and
``Visibility`` (``.visibility``) of one
upstream (``RemoteRegistry``). What every upstream shares is handed in: the fetches in
flight and their readers (``InFlight``), the manifests in memory (``ManifestLRU``),
tag freshness (``TagFreshness``) and the expiry ledger (``Usage``). ``Mirrors``
(``.mirrors``) routes a request to one of them.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.threads import deferToThreadPool

from regmirror.domain.digest import Digest
from regmirror.domain.events import RecentErrors
from regmirror.domain.kinds import Kind
from regmirror.domain.media import Accept
from regmirror.expiry.usage import NoUsage, Usage
from regmirror.fetch.body import TuneTransport, leave_transport
from regmirror.fetch.inflight import InFlight
from regmirror.fetch.writers import InlineWriter, WriterFactory
from regmirror.mirror.blobs import Blobs
from regmirror.mirror.freshness import LocalTagFreshness, TagFreshness
from regmirror.mirror.manifests import Manifest, ManifestLRU, Manifests
from regmirror.mirror.referrers import Referrers, ReferrersAnswer
from regmirror.mirror.sources import BlobSource
from regmirror.mirror.tags import Tags
from regmirror.mirror.visibility import Visibility
from regmirror.reactor import Reactor
from regmirror.storage.store import Store
from regmirror.upstream.remote import RemoteRegistry


class Cache:
    """The pull-through cache of one upstream. ``tag_freshness`` is its freshness
    window; ``tune_transport`` is given each upstream blob body's transport
    (``regmirror.fetch.body``); ``errors`` records the blob fetches that failed."""

    def __init__(
        self,
        reactor: Reactor,
        store: Store,
        upstream: RemoteRegistry,
        *,
        inflight: InFlight,
        lru: ManifestLRU,
        usage: Usage | None = None,
        freshness: TagFreshness | None = None,
        tag_freshness: float = 30.0,
        fsync: bool = True,
        writer: WriterFactory = InlineWriter,
        tune_transport: TuneTransport = leave_transport,
        errors: RecentErrors | None = None,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self.inflight = inflight
        self._lru = lru
        self.upstream = upstream
        self.stats: Counter[str] = Counter()  # read by regmirror.api.metrics
        usage = usage if usage is not None else NoUsage()
        freshness = freshness if freshness is not None else LocalTagFreshness(reactor)
        self._visibility = Visibility(store, upstream, inflight)
        self._manifests = Manifests(store, upstream, self._visibility, lru, usage, self.stats)
        self._tags = Tags(
            reactor,
            store,
            upstream,
            self._manifests,
            self._visibility,
            freshness,
            tag_freshness,
            self.stats,
        )
        self._referrers = Referrers(reactor, store, upstream, freshness, tag_freshness, self.stats)
        self._blobs = Blobs(
            reactor,
            store,
            upstream,
            self._visibility,
            inflight,
            usage,
            self.stats,
            fsync=fsync,
            writer=writer,
            tune_transport=tune_transport,
            errors=errors if errors is not None else RecentErrors(reactor.seconds),
        )

    # -- blobs -----------------------------------------------------------------------

    async def blob(self, name: str, digest: Digest) -> BlobSource:
        """Where to read the blob from (``regmirror.mirror.sources``); call its
        ``release`` when done."""
        return await self._blobs.blob(name, digest)

    async def blob_size(self, name: str, digest: Digest) -> int:
        return await self._blobs.blob_size(name, digest)

    def count_served(self, sent: int) -> None:
        """A blob response ended, ``sent`` body bytes sent to its client (``stats``'
        ``blob_bytes_served``, for the status page and the metrics)."""
        self.stats["blob_bytes_served"] += sent

    def has_blob(self, digest: Digest) -> bool:
        """The blob is in the store (verified), whoever asked for it."""
        return self._store.blob_size(digest) is not None

    # -- manifests -------------------------------------------------------------------

    async def manifest(self, name: str, reference: str | Digest, accept: Accept) -> Manifest:
        repository = self.upstream.repository(name)
        if isinstance(reference, Digest):
            return await self._manifests.by_digest(repository, reference, accept)
        return await self._tags.resolve(repository, reference, accept)

    def fresh_manifest(self, name: str, reference: str | Digest, accept: Accept) -> Manifest | None:
        """The manifest from memory or disk, if it can be served without asking upstream:
        by digest, or by a tag checked within its freshness window."""
        repository = self.upstream.repository(name)
        if isinstance(reference, Digest):
            manifest = self._manifests.fresh(repository, reference, accept)
        else:
            manifest = self._tags.fresh(repository, reference, accept)
        if manifest is not None:
            self.stats["manifest_hits"] += 1
        return manifest

    def cached_manifest(self, digest: Digest) -> Manifest | None:
        return self._manifests.cached(digest)

    def cached_tag(self, name: str, tag: str, accept: Accept) -> Manifest | None:
        """What the tag resolves to in the cache now, without asking upstream, however
        long ago it was checked (None: not cached)."""
        return self._tags.cached(self.upstream.repository(name), tag, accept)

    # -- referrers -------------------------------------------------------------------

    async def referrers(
        self, name: str, subject: Digest, artifact_types: frozenset[str]
    ) -> ReferrersAnswer:
        """The OCI 1.1 referrers index of ``subject`` (``regmirror.mirror.referrers``)."""
        repository = self.upstream.repository(name)
        return await self._referrers.answer(repository, subject, artifact_types)

    # -- tags and catalog ------------------------------------------------------------

    async def tags(self, name: str, n: int | None, last: str | None) -> tuple[bytes, str | None]:
        return await self._tags.tag_list(name, n, last)

    async def repositories(self) -> list[str]:
        """The repositories of this upstream in the cache (a directory walk, in a
        thread)."""
        names: list[str] = await deferToThreadPool(
            self._reactor,  # type: ignore[arg-type]
            self._reactor.getThreadPool(),
            self._store.catalog,
            self.upstream.name,
        )
        return names

    # -- what expiry asks and tells --------------------------------------------------

    def in_use(self, digest: Digest) -> bool:
        """Being read or written: the reaper leaves it alone."""
        return self.inflight.in_use(digest)

    def forget(self, kind: Kind, digest: Digest) -> None:
        """The reaper removed ``digest``: drop what memory holds of it."""
        self._visibility.forget(digest)
        if kind == Kind.MANIFEST:
            self._lru.forget(digest)
            self._tags.forget_digest(digest)
            self._referrers.forget_subject(digest)

    def forget_tag(self, repository: str, tag: str) -> None:
        """A tag was purged (``repository`` as the store names it)."""
        self._tags.forget_tag(repository, tag)
