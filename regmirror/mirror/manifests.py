"""Manifests by digest: from memory, from disk, or fetched upstream and verified.

A manifest is content-addressed and immutable: once its digest matched it is served
from the cache for ever (``Manifests.fetch`` is where it is verified and stored). The
most recently used ones are kept in memory (``ManifestLRU``, one for all upstreams,
``regmirror.manifest_cache_size``), so the fast path answers without touching the disk.
Tags resolve to these (``regmirror.mirror.tags``).
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.errors import ManifestUnknown, Unavailable
from regmirror.domain.kinds import Kind
from regmirror.domain.media import ANY, Accept
from regmirror.domain.references import manifest_references
from regmirror.expiry.usage import Usage
from regmirror.fetch.singleflight import SingleFlight
from regmirror.logs import get_logger
from regmirror.mirror.visibility import Visibility
from regmirror.storage.store import Store
from regmirror.upstream.remote import RemoteRegistry

log = get_logger()

DEFAULT_BUDGET = 64 * 1024 * 1024


@attrs.frozen
class Manifest:
    digest: Digest
    data: bytes
    media_type: str


class ManifestLRU:
    """Manifests in memory, least recently used dropped first past ``budget`` bytes."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.bytes = 0
        self._manifests: OrderedDict[Digest, Manifest] = OrderedDict()

    def __len__(self) -> int:
        return len(self._manifests)

    def get(self, digest: Digest) -> Manifest | None:
        manifest = self._manifests.get(digest)
        if manifest is not None:
            self._manifests.move_to_end(digest)
        return manifest

    def remember(self, manifest: Manifest) -> None:
        if manifest.digest in self._manifests:
            return
        self._manifests[manifest.digest] = manifest
        self.bytes += len(manifest.data)
        while self.bytes > self.budget and self._manifests:
            _, old = self._manifests.popitem(last=False)
            self.bytes -= len(old.data)

    def forget(self, digest: Digest) -> None:
        old = self._manifests.pop(digest, None)
        if old is not None:
            self.bytes -= len(old.data)


class Manifests:
    """The manifests of one upstream's repositories, by digest."""

    def __init__(
        self,
        store: Store,
        remote: RemoteRegistry,
        visibility: Visibility,
        lru: ManifestLRU,
        usage: Usage,
        stats: Counter[str],
    ) -> None:
        self._store = store
        self._remote = remote
        self._visibility = visibility
        self._lru = lru
        self._usage = usage
        self._stats = stats
        self._flight: SingleFlight[Manifest] = SingleFlight()

    def cached(self, digest: Digest) -> Manifest | None:
        """From memory or disk (a use, for expiry), else None."""
        manifest = self._lru.get(digest)
        if manifest is None:
            found = self._store.read_manifest(digest)
            if found is None:
                return None
            manifest = Manifest(digest, *found)
            self._lru.remember(manifest)
        self._usage.used(digest)
        return manifest

    def fresh(self, repository: str, digest: Digest, accept: Accept) -> Manifest | None:
        """The fast path: the cached manifest, if ``repository`` may see it and the
        client accepts its type; else None (the slow path decides)."""
        if not self._visibility.visible(repository, digest, Kind.MANIFEST):
            return None
        manifest = self.cached(digest)
        return manifest if manifest is not None and accept.accepts(manifest.media_type) else None

    async def by_digest(self, repository: str, digest: Digest, accept: Accept) -> Manifest:
        manifest = self.cached(digest)
        if manifest is not None and not self._visibility.visible(repository, digest, Kind.MANIFEST):
            await self._visibility.check_reference(repository, digest, Kind.MANIFEST)
            self._visibility.link_references(repository, manifest.media_type, manifest.data)
        if manifest is None:
            manifest = await self._flight.run(
                (repository, digest), lambda: self.fetch(repository, str(digest), ANY, digest)
            )
        if not accept.accepts(manifest.media_type):
            raise ManifestUnknown(
                "the manifest's media type is not one the client accepts",
                {"digest": str(digest), "mediaType": manifest.media_type},
            )
        return manifest

    async def fetch(
        self, repository: str, reference: str, accept: Accept, expected: Digest | None
    ) -> Manifest:
        """GET it upstream (by tag, or by digest when ``expected``), verify its digest,
        store it and link it to ``repository``."""
        self._stats["manifest_fetches"] += 1
        got = await self._remote.get_manifest(repository, reference, accept)
        digest = Digest.of(got.data, expected.algorithm if expected else "sha256")
        if (expected is not None and digest != expected) or (
            expected is None and got.digest and got.digest != str(digest)
        ):
            log.error(
                "manifest {reference} of {repository}: upstream sent content with digest "
                "{actual}; discarded",
                reference=reference,
                repository=repository,
                actual=str(digest),
            )
            raise Unavailable(
                "the upstream sent a manifest that does not match its digest",
                {"reference": reference},
            )
        manifest = Manifest(digest, got.data, got.media_type)
        self._store.write_manifest(digest, got.data, got.media_type)
        self._visibility.link(repository, digest, Kind.MANIFEST)
        self._visibility.link_references(repository, got.media_type, got.data)
        self._lru.remember(manifest)
        self._usage.added(Kind.MANIFEST, digest, len(got.data), manifest_references(got.data))
        log.info(
            "manifest {repository}@{digest} from {upstream}",
            repository=repository,
            digest=str(digest),
            upstream=self._remote.name,
        )
        return manifest
