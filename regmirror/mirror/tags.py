"""Tags: revalidated upstream once per freshness window, served stale when the upstream
cannot answer, and the tag lists.

A tag resolves to one digest per media type (a tag can name different manifests for
clients that accept different types), as last seen upstream: kept in memory per
repository, loaded lazily from the store. Within the window (``TagFreshness``) a tag is
answered from the cache; past it, one ``HEAD`` (shared by all concurrent requests for
that tag and Accept set) revalidates it: the same digest, or another one already
cached, is served; otherwise one ``GET``. An unreachable, failing or rate-limiting
upstream gets the cached manifest served stale; a 404 drops the tag. In a cluster the
replicas share the checks (``TagFreshness.settle``): one replica asks the upstream, the
others serve what it found.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from regmirror.domain.digest import Digest
from regmirror.domain.errors import ManifestUnknown, NameUnknown, RegistryError
from regmirror.domain.kinds import Kind
from regmirror.domain.media import Accept
from regmirror.domain.pagination import tag_list_page
from regmirror.fetch.singleflight import SingleFlight
from regmirror.logs import get_logger
from regmirror.mirror.freshness import Seen, TagFreshness, TagRef, Turn
from regmirror.mirror.manifests import Manifest, Manifests
from regmirror.mirror.visibility import Visibility
from regmirror.reactor import ReactorTime
from regmirror.storage.store import Store
from regmirror.upstream.remote import RemoteRegistry

log = get_logger()

Variants = dict[str, str]  # media type -> digest, as last seen upstream
MAX_REFS = 10_000  # (repository, tag) -> TagRef remembered

# The digests tags resolve to, parsed once (a fresh tag is answered from memory, and a
# parse is a large part of that answer); invalid ones raise, and are not remembered.
_digest = lru_cache(maxsize=MAX_REFS)(Digest.parse)


class Tags:
    """The tags of one upstream's repositories; ``window`` is its tag freshness."""

    def __init__(
        self,
        clock: ReactorTime,
        store: Store,
        remote: RemoteRegistry,
        manifests: Manifests,
        visibility: Visibility,
        freshness: TagFreshness,
        window: float,
        stats: Counter[str],
    ) -> None:
        self._clock = clock
        self._store = store
        self._remote = remote
        self._manifests = manifests
        self._visibility = visibility
        self._freshness = freshness
        self.window = window
        self._stats = stats
        self._flight: SingleFlight[Manifest] = SingleFlight()
        self._variants: dict[TagRef, Variants] = {}
        self._refs: dict[tuple[str, str], TagRef] = {}

    def fresh(self, repository: str, tag: str, accept: Accept) -> Manifest | None:
        """The cached manifest a tag resolves to, if it was checked within its freshness
        window (for a media type the client accepts)."""
        ref = self._ref(repository, tag)
        picked = _pick(self._load(ref), accept)
        if picked is None:
            return None
        media_type, digest = picked
        if not self._freshness.fresh(ref, media_type, self.window):
            return None
        return self._manifests.cached(digest)

    def cached(self, repository: str, tag: str, accept: Accept) -> Manifest | None:
        """The cached manifest a tag resolves to now, however long ago it was checked."""
        picked = _pick(self._load(self._ref(repository, tag)), accept)
        return self._manifests.cached(picked[1]) if picked is not None else None

    async def resolve(self, repository: str, tag: str, accept: Accept) -> Manifest:
        manifest = self.fresh(repository, tag, accept)
        if manifest is not None:
            return manifest
        return await self._flight.run(
            (repository, tag, accept.types), lambda: self._revalidate(repository, tag, accept)
        )

    async def _revalidate(self, repository: str, tag: str, accept: Accept) -> Manifest:
        ref = self._ref(repository, tag)
        settled = await self._freshness.settle(ref, accept, self.window)
        if isinstance(settled, Seen):
            manifest = self._adopt(ref, settled, accept)
            if manifest is not None:
                return manifest
            settled = Turn()  # what it names is no longer here: check it again
        try:
            return await self._check(ref, accept)
        finally:
            settled.done()

    def _adopt(self, ref: TagRef, seen: Seen, accept: Accept) -> Manifest | None:
        """Another replica checked the tag within the window: serve what it found (its
        manifest is in the shared store), and remember it here."""
        try:
            manifest = self._manifests.cached(Digest.parse(seen.digest))
        except RegistryError:
            return None
        if manifest is None or not accept.accepts(manifest.media_type):
            return None
        variants = self._load(ref)
        variants.pop(seen.media_type, None)
        variants[seen.media_type] = seen.digest
        self._stats["tag_shared"] += 1
        return manifest

    async def _check(self, ref: TagRef, accept: Accept) -> Manifest:
        repository, tag = ref.repository, ref.tag
        picked = _pick(self._load(ref), accept)
        cached = self._manifests.cached(picked[1]) if picked is not None else None
        now = self._clock.seconds()
        if picked is not None and cached is not None:
            media_type = picked[0]
            self._stats["tag_checks"] += 1
            try:
                head = await self._remote.head_manifest(repository, tag, accept)
            except RegistryError as e:
                return self._stale(ref, media_type, cached, e.message)
            if head.code == 404:
                self._forget(ref)
                raise ManifestUnknown("manifest unknown to the upstream registry", {"tag": tag})
            if head.code != 200:
                return self._stale(ref, media_type, cached, f"upstream answered {head.code}")
            if head.digest == str(cached.digest):
                self._freshness.checked(ref, media_type, now, str(cached.digest), self.window)
                return cached
            if head.digest:
                try:
                    other = self._manifests.cached(Digest.parse(head.digest))
                except RegistryError:
                    other = None
                if other is not None and accept.accepts(other.media_type):
                    self._visibility.link(repository, other.digest, Kind.MANIFEST)
                    self._visibility.link_references(repository, other.media_type, other.data)
                    self._record(ref, other, now)
                    return other
        try:
            manifest = await self._manifests.fetch(repository, tag, accept, None)
        except ManifestUnknown:
            self._forget(ref)
            raise
        except RegistryError as e:
            if picked is not None and cached is not None:
                return self._stale(ref, picked[0], cached, e.message)
            raise
        self._record(ref, manifest, self._clock.seconds())
        return manifest

    def _stale(self, ref: TagRef, media_type: str, manifest: Manifest, reason: str) -> Manifest:
        self._stats["stale"] += 1
        log.warn(
            "serving {repository}:{tag} stale from the cache: {reason}",
            repository=ref.repository,
            tag=ref.tag,
            reason=reason,
        )
        self._freshness.checked(
            ref, media_type, self._clock.seconds(), str(manifest.digest), self.window
        )
        return manifest

    def _ref(self, repository: str, tag: str) -> TagRef:
        ref = self._refs.get((repository, tag))
        if ref is None:
            if len(self._refs) >= MAX_REFS:
                self._refs.clear()
            ref = self._refs[repository, tag] = TagRef(self._remote.name, repository, tag)
        return ref

    def _load(self, ref: TagRef) -> Variants:
        variants = self._variants.get(ref)
        if variants is None:
            variants = self._store.read_tag(ref.upstream, ref.repository, ref.tag)
            self._variants[ref] = variants
        return variants

    def _record(self, ref: TagRef, manifest: Manifest, now: float) -> None:
        variants = self._load(ref)
        variants.pop(manifest.media_type, None)
        variants[manifest.media_type] = str(manifest.digest)
        self._store.write_tag(ref.upstream, ref.repository, ref.tag, variants)
        self._freshness.checked(ref, manifest.media_type, now, str(manifest.digest), self.window)

    def _forget(self, ref: TagRef) -> None:
        self._variants.pop(ref, None)
        self._freshness.forget(ref)
        self._store.delete_tag(ref.upstream, ref.repository, ref.tag)

    def forget_tag(self, repository: str, tag: str) -> None:
        """The tag was purged: drop it from memory and the store."""
        self._forget(self._ref(repository, tag))

    def forget_digest(self, digest: Digest) -> None:
        """The manifest ``digest`` was removed (the store dropped its tags): tags that
        resolved to it are read again."""
        key = str(digest)
        for ref, variants in list(self._variants.items()):
            if key in variants.values():
                del self._variants[ref]
                self._freshness.forget(ref)

    # -- tag lists -------------------------------------------------------------------

    async def tag_list(
        self, name: str, n: int | None, last: str | None
    ) -> tuple[bytes, str | None]:
        """``tags/list``: the upstream's full list (following its own pages), stored, then
        paginated here in lexical order (distribution 2.8 ignores ``n``); the last full
        list seen when the upstream is down."""
        repository = self._remote.repository(name)
        try:
            tags = await self._remote.tag_list(repository, name)
        except RegistryError as error:
            cached = self._store.read_tag_list(self._remote.name, repository)
            if cached is None or isinstance(error, NameUnknown):
                raise
            log.warn(
                "serving the tag list of {name} stale: {reason}", name=name, reason=error.message
            )
            tags = cached
        else:
            self._store.write_tag_list(self._remote.name, repository, tags)
        return tag_list_page(name, tags, n, last)


def _pick(variants: Variants, accept: Accept) -> tuple[str, Digest] | None:
    """The digest last seen for the most recent media type the client accepts."""
    for media_type, digest in reversed(variants.items()):
        if accept.accepts(media_type):
            return media_type, _digest(digest)
    return None
