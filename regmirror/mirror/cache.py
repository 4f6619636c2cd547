"""The pull-through cache: single-flight fetches, tag freshness, stale serving.

``Cache`` answers the web layer's questions (a manifest, a blob, a tag list, the
catalog) from disk when it can and from the upstream when it must, sharing every
upstream fetch among all the clients that ask for the same thing at once.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import attrs
from treq.response import _Response
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from regmirror.domain.digest import Digest
from regmirror.domain.errors import (
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    Unavailable,
)
from regmirror.domain.kinds import Kind
from regmirror.domain.names import DOCKER_HUB_HOSTS, is_well_known_registry
from regmirror.expiry.reaper import BLOB, MANIFEST, Reaper, manifest_references
from regmirror.fetch.blobfetch import BlobFetch, DigestMismatch, InlineWriter, State, WriterFactory
from regmirror.fetch.singleflight import SingleFlight
from regmirror.logs import get_logger
from regmirror.mirror.sources import BlobSource, CommittedBlob, FollowedFetch, PassThrough
from regmirror.storage.store import Store, is_disk_full
from regmirror.upstream.client import Upstream

log = get_logger()

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
)
ALL_MANIFEST_TYPES = ", ".join(MANIFEST_TYPES)
MAX_TAG_PAGES = 100
INDEX_TYPES = frozenset(MANIFEST_TYPES[:2])


# What the cache needs of a reactor: IReactorTime and IReactorThreads.
Reactor = Any


@attrs.frozen
class Manifest:
    digest: Digest
    data: bytes
    media_type: str


@attrs.frozen
class Accept:
    """The manifest media types a client accepts; ``types=None`` means any."""

    types: frozenset[str] | None

    @classmethod
    def parse(cls, headers: list[str] | None) -> Accept:
        if not headers:
            return cls(None)
        types = set()
        for header in headers:
            for item in header.split(","):
                media_type = item.split(";", 1)[0].strip().lower()
                if media_type in ("*/*", "application/*", "application/json"):
                    return cls(None)
                if media_type:
                    types.add(media_type)
        return cls(frozenset(types) if types else None)

    def accepts(self, media_type: str) -> bool:
        return self.types is None or media_type in self.types

    def header(self) -> str:
        if self.types is None:
            return ALL_MANIFEST_TYPES
        return ", ".join(sorted(self.types))


@attrs.define
class TagState:
    variants: dict[str, str]  # media type -> digest, as last seen upstream
    checked: dict[str, float] = attrs.Factory(dict)  # media type -> when


class _TooBig(Exception):
    pass


class Shared:
    """What the caches of all upstreams share: blobs are content-addressed, so a fetch
    in flight, its readers and the manifests held in memory are the same whichever
    upstream a client asked through."""

    def __init__(self, manifest_cache_size: int = 64 * 1024 * 1024, max_fetches: int = 0) -> None:
        self.fetch_slots = DeferredSemaphore(max_fetches) if max_fetches > 0 else None
        self.fetches: dict[Digest, BlobFetch] = {}
        self.blob_flight: SingleFlight[BlobFetch] = SingleFlight()
        self.readers: Counter[str] = Counter()
        self.manifests: OrderedDict[Digest, Manifest] = OrderedDict()
        self.manifest_bytes = 0
        self.manifest_budget = manifest_cache_size
        self.failures: Counter[str] = Counter()  # failed blob downloads, by reason


class Cache:
    def __init__(
        self,
        reactor: Reactor,
        store: Store,
        upstream: Upstream,
        *,
        tag_freshness: float = 30.0,
        fsync: bool = True,
        manifest_cache_size: int = 64 * 1024 * 1024,
        max_manifest_size: int = 4 * 1024 * 1024,
        read_timeout: float = 60.0,
        writer: WriterFactory = InlineWriter,
        reaper: Reaper | None = None,
        shared: Shared | None = None,
    ) -> None:
        self._reactor = reactor
        self._writer = writer
        self.reaper = reaper
        self._shared = shared = shared or Shared(manifest_cache_size)
        self._readers = shared.readers
        self.store = store
        self.upstream = upstream
        self.tag_freshness = tag_freshness
        self._fsync = fsync
        self._max_manifest = max_manifest_size
        self._read_timeout = read_timeout
        self._fetches = shared.fetches
        self._blob_flight = shared.blob_flight
        self._manifest_flight: SingleFlight[Manifest] = SingleFlight()
        self._tags: dict[tuple[str, str], TagState] = {}
        self._manifests = shared.manifests
        # digest -> {(repository, kind)} known to reference it (private upstreams only)
        self._links: dict[str, set[tuple[str, str]]] = {}
        self.stats: Counter[str] = Counter()  # read by regmirror.metrics

    @property
    def shared(self) -> Shared:
        return self._shared

    # -- blobs -----------------------------------------------------------------------

    async def blob(self, name: str, digest: Digest) -> BlobSource:
        """The blob from disk, or the fetch in flight that is downloading it (with a
        descriptor of its temporary file), or, for a blob that cannot fit in the quota,
        an upstream response to pass through. Call the ``release`` given when done."""
        await self._check_reference(self.upstream.repository(name), digest, BLOB)
        cached = self._open_cached(digest)
        if cached is not None:
            self.stats["blob_hits"] += 1
            return cached
        fetch = self._fetches.get(digest)
        if fetch is not None or digest in self._blob_flight:
            self.stats["blob_joins"] += 1
        if fetch is None:
            try:
                fetch = await self._blob_flight.run(digest, lambda: self._start_fetch(name, digest))
            except _TooBig:
                return await self._pass_through(name, digest)
        if fetch.size is not None and not fetch.failed:
            try:
                fd = fetch.open_reader()
            except FileNotFoundError:
                pass  # committed, or failed, in the meantime
            else:
                return FollowedFetch(fetch, fd, fetch.size, self._reading(str(digest)))
        if fetch.state is not State.COMMITTED and not fetch.failed:
            # The upstream did not say how long the blob is: serve it once verified.
            await fetch.when_committed()
        cached = self._open_cached(digest)
        if cached is None:
            raise Unavailable(
                "the upstream did not deliver the blob intact; try again",
                {"digest": str(digest)},
            )
        return cached

    def _open_cached(self, digest: Digest) -> CommittedBlob | None:
        opened = self.store.open_blob(digest)
        if opened is None:
            return None
        key = str(digest)
        if self.reaper is not None:
            self.reaper.used(key)
        return CommittedBlob(*opened, release=self._reading(key))

    def _reading(self, key: str) -> Callable[[], None]:
        """Count a reader of ``key`` (never evicted while read) until released."""
        self._readers[key] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._readers[key] -= 1
                if self._readers[key] <= 0:
                    del self._readers[key]

        return release

    def in_use(self, key: str) -> bool:
        """Being read or written: the reaper leaves it alone."""
        if key in self._readers:
            return True
        try:
            return Digest.parse(key) in self._fetches
        except RegistryError:
            return False

    # -- private upstreams: content is served only to repositories that reference it --

    def _linked(self, repository: str, digest: Digest, kind: str) -> bool:
        key = str(digest)
        if (repository, kind) in self._links.get(key, ()):
            return True
        if self.store.has_link(self.upstream.name, repository, digest, Kind(kind)):
            self._links.setdefault(key, set()).add((repository, kind))
            return True
        return False

    def _link(self, repository: str, digest: Digest, kind: str) -> None:
        if kind == MANIFEST:
            self.store.link_manifest(self.upstream.name, repository, digest)
        else:
            self.store.link_blob(self.upstream.name, repository, digest)
        self._links.setdefault(str(digest), set()).add((repository, kind))

    def _visible(self, repository: str, digest: Digest, kind: str) -> bool:
        """Whether cached content may be served for ``repository`` without asking."""
        return not self.upstream.authenticated or self._linked(repository, digest, kind)

    async def _check_reference(self, repository: str, digest: Digest, kind: str) -> None:
        """When the upstream is reached with credentials, content cached for one
        repository is served for another only once that one is known to reference it:
        a cached manifest of it lists it, or the upstream says so (one HEAD), and then it
        is linked. Public upstreams skip this."""
        if self._visible(repository, digest, kind):
            return
        if kind == BLOB and self.store.blob_size(digest) is None and digest not in self._fetches:
            return  # not cached: the fetch asks the upstream for this repository anyway
        what = "manifests" if kind == MANIFEST else "blobs"
        headers = {"accept": ALL_MANIFEST_TYPES} if kind == MANIFEST else None
        response = await self.upstream.request(
            "HEAD", f"/v2/{repository}/{what}/{digest}", repository, headers
        )
        await _discard(response)
        if response.code != 200:
            raise self.upstream.error_for(response, kind)
        self._link(repository, digest, kind)

    def _link_references(self, repository: str, manifest: Manifest) -> None:
        if not self.upstream.authenticated:
            return
        kind = MANIFEST if manifest.media_type in INDEX_TYPES else BLOB
        for ref in manifest_references(manifest.data):
            self._link(repository, Digest.parse(ref), kind)

    def forget(self, kind: str, key: str) -> None:
        """The reaper removed ``key``: drop what memory holds of it."""
        self._links.pop(key, None)
        if kind != MANIFEST:
            return
        digest = Digest.parse(key)
        old = self._manifests.pop(digest, None)
        if old is not None:
            self._shared.manifest_bytes -= len(old.data)
        for tag_key, state in list(self._tags.items()):
            if key in state.variants.values():
                del self._tags[tag_key]

    async def _get_blob(self, repository: str, digest: Digest) -> _Response:
        """The upstream's answer to a blob GET, its body not read yet (errors raised)."""
        response = await self.upstream.request(
            "GET", f"/v2/{repository}/blobs/{digest}", repository, unbuffered=True
        )
        if response.code != 200:
            await _discard(response)
            raise self.upstream.error_for(response, "blob")
        return response

    async def _pass_through(self, name: str, digest: Digest) -> PassThrough:
        response = await self._get_blob(self.upstream.repository(name), digest)
        if response.length is UNKNOWN_LENGTH:
            await _discard(response)
            raise Unavailable("the upstream sent no blob size", {"digest": str(digest)})
        log.warn(
            "blob {digest} ({size} bytes) does not fit in the cache quota: passed through",
            digest=str(digest),
            size=response.length,
        )
        return PassThrough(response, digest, int(response.length))

    async def blob_size(self, name: str, digest: Digest) -> int:
        """For ``HEAD``: the size of a blob, asking upstream (without fetching) on a miss."""
        await self._check_reference(self.upstream.repository(name), digest, BLOB)
        size = self.store.blob_size(digest)
        if size is not None:
            return size
        fetch = self._fetches.get(digest)
        if fetch is not None and fetch.size is not None:
            return fetch.size
        repository = self.upstream.repository(name)
        response = await self.upstream.request(
            "HEAD", f"/v2/{repository}/blobs/{digest}", repository
        )
        await _discard(response)
        if response.code != 200:
            raise self.upstream.error_for(response, "blob")
        length = response.headers.getRawHeaders("content-length", [""])[0]
        if not length.isdigit():
            raise Unavailable("the upstream sent no blob size", {"digest": str(digest)})
        return int(length)

    async def _start_fetch(self, name: str, digest: Digest) -> BlobFetch:
        slots = self._shared.fetch_slots
        if slots is None:
            return await self._start_fetch_now(name, digest, None)
        await slots.acquire()  # regmirror.max_upstream_fetches: wait for a slot
        try:
            return await self._start_fetch_now(name, digest, slots)
        except BaseException:
            slots.release()
            raise

    async def _start_fetch_now(
        self, name: str, digest: Digest, slots: DeferredSemaphore | None
    ) -> BlobFetch:
        repository = self.upstream.repository(name)
        response = await self._get_blob(repository, digest)
        size = None if response.length is UNKNOWN_LENGTH else int(response.length)
        if self.reaper is not None and not self.reaper.reserve(digest, size or 0):
            await _discard(response)
            raise _TooBig()
        fetch = BlobFetch(
            self.store,
            digest,
            size,
            fsync=self._fsync,
            writer=self._writer,
            on_done=lambda f: self._fetch_done(f, repository, slots),
        )
        self._fetches[digest] = fetch
        self.stats["blob_fetches"] += 1
        log.info(
            "blob {digest} from {upstream} ({size} bytes)",
            digest=str(digest),
            upstream=self.upstream.name,
            size=size,
        )
        response.deliverBody(_BlobBody(fetch, self._reactor, self._read_timeout))
        return fetch

    def _fetch_done(
        self, fetch: BlobFetch, repository: str, slots: DeferredSemaphore | None = None
    ) -> None:
        if slots is not None:
            slots.release()
        if self._fetches.get(fetch.digest) is fetch:
            del self._fetches[fetch.digest]
        if self.reaper is not None:
            self.reaper.release(fetch.digest)
        if fetch.state is State.COMMITTED:
            self._link(repository, fetch.digest, BLOB)
            if self.reaper is not None:
                self.reaper.added(BLOB, str(fetch.digest), fetch.size or 0)
            log.info("blob {digest} cached", digest=str(fetch.digest))
        else:
            if isinstance(fetch.error, DigestMismatch):
                self._shared.failures["digest"] += 1
            elif fetch.error is not None and is_disk_full(fetch.error):
                self._shared.failures["disk"] += 1
                if self.reaper is not None:
                    self.reaper.evict()
            else:
                self._shared.failures["upstream"] += 1

    # -- manifests -------------------------------------------------------------------

    async def manifest(self, name: str, reference: str | Digest, accept: Accept) -> Manifest:
        repository = self.upstream.repository(name)
        if isinstance(reference, Digest):
            return await self._manifest_by_digest(repository, reference, accept)
        return await self._manifest_by_tag(repository, reference, accept)

    def cached_manifest(self, digest: Digest) -> Manifest | None:
        manifest = self._manifests.get(digest)
        if manifest is not None:
            self._manifests.move_to_end(digest)
            if self.reaper is not None:
                self.reaper.used(str(digest))
            return manifest
        found = self.store.read_manifest(digest)
        if found is None:
            return None
        manifest = Manifest(digest, *found)
        self._remember(manifest)
        if self.reaper is not None:
            self.reaper.used(str(digest))
        return manifest

    def _remember(self, manifest: Manifest) -> None:
        if manifest.digest in self._manifests:
            return
        shared = self._shared
        self._manifests[manifest.digest] = manifest
        shared.manifest_bytes += len(manifest.data)
        while shared.manifest_bytes > shared.manifest_budget and self._manifests:
            _, old = self._manifests.popitem(last=False)
            shared.manifest_bytes -= len(old.data)

    async def _manifest_by_digest(
        self, repository: str, digest: Digest, accept: Accept
    ) -> Manifest:
        manifest = self.cached_manifest(digest)
        if manifest is not None and not self._visible(repository, digest, MANIFEST):
            await self._check_reference(repository, digest, MANIFEST)
            self._link_references(repository, manifest)
        if manifest is None:
            manifest = await self._manifest_flight.run(
                ("digest", repository, digest),
                lambda: self._fetch_manifest(repository, str(digest), Accept(None), digest),
            )
        if not accept.accepts(manifest.media_type):
            raise ManifestUnknown(
                "the manifest's media type is not one the client accepts",
                {"digest": str(digest), "mediaType": manifest.media_type},
            )
        return manifest

    def _tag_state(self, repository: str, tag: str) -> TagState:
        key = (repository, tag)
        state = self._tags.get(key)
        if state is None:
            variants = self.store.read_tag(self.upstream.name, repository, tag)
            state = self._tags[key] = TagState(variants)
        return state

    def _pick(self, state: TagState, accept: Accept) -> tuple[str, Digest] | None:
        for media_type, digest in reversed(state.variants.items()):
            if accept.accepts(media_type):
                return media_type, Digest.parse(digest)
        return None

    def fresh_manifest(self, name: str, reference: str | Digest, accept: Accept) -> Manifest | None:
        manifest = self._fresh_manifest(name, reference, accept)
        if manifest is not None:
            self.stats["manifest_hits"] += 1
        return manifest

    def _fresh_manifest(
        self, name: str, reference: str | Digest, accept: Accept
    ) -> Manifest | None:
        """The manifest from memory or disk, if it can be served without asking upstream:
        by digest, or by a tag checked within its freshness window."""
        repository = self.upstream.repository(name)
        if isinstance(reference, Digest):
            if not self._visible(repository, reference, MANIFEST):
                return None
            manifest = self.cached_manifest(reference)
            return (
                manifest if manifest is not None and accept.accepts(manifest.media_type) else None
            )
        return self._fresh_tag(repository, reference, accept)

    def _fresh_tag(self, repository: str, tag: str, accept: Accept) -> Manifest | None:
        """The cached manifest a tag resolves to, if it was checked within its freshness
        window (for a media type the client accepts)."""
        state = self._tag_state(repository, tag)
        picked = self._pick(state, accept)
        if picked is None:
            return None
        media_type, digest = picked
        if (
            self._reactor.seconds() - state.checked.get(media_type, float("-inf"))
            >= self.tag_freshness
        ):
            return None
        return self.cached_manifest(digest)

    async def _manifest_by_tag(self, repository: str, tag: str, accept: Accept) -> Manifest:
        manifest = self._fresh_tag(repository, tag, accept)
        if manifest is not None:
            return manifest
        return await self._manifest_flight.run(
            ("tag", repository, tag, accept.types),
            lambda: self._refresh_tag(repository, tag, accept),
        )

    async def _refresh_tag(self, repository: str, tag: str, accept: Accept) -> Manifest:
        state = self._tag_state(repository, tag)
        picked = self._pick(state, accept)
        cached = self.cached_manifest(picked[1]) if picked is not None else None
        now = self._reactor.seconds()
        if picked is not None and cached is not None:
            media_type = picked[0]
            self.stats["tag_checks"] += 1
            try:
                response = await self.upstream.request(
                    "HEAD",
                    f"/v2/{repository}/manifests/{tag}",
                    repository,
                    {"accept": accept.header()},
                )
                await _discard(response)
            except RegistryError as e:
                return self._stale(state, media_type, cached, repository, tag, e.message)
            if response.code == 404:
                self._forget_tag(repository, tag)
                raise ManifestUnknown("manifest unknown to the upstream registry", {"tag": tag})
            if response.code != 200:
                reason = f"upstream answered {response.code}"
                return self._stale(state, media_type, cached, repository, tag, reason)
            header = response.headers.getRawHeaders("docker-content-digest", [""])[0]
            if header == str(cached.digest):
                state.checked[media_type] = now
                return cached
            if header:
                try:
                    other = self.cached_manifest(Digest.parse(header))
                except RegistryError:
                    other = None
                if other is not None and accept.accepts(other.media_type):
                    self._link(repository, other.digest, MANIFEST)
                    self._link_references(repository, other)
                    self._record_tag(repository, tag, other, now)
                    return other
        try:
            manifest = await self._fetch_manifest(repository, tag, accept, None)
        except ManifestUnknown:
            self._forget_tag(repository, tag)
            raise
        except RegistryError as e:
            if picked is not None and cached is not None:
                return self._stale(state, picked[0], cached, repository, tag, e.message)
            raise
        self._record_tag(repository, tag, manifest, self._reactor.seconds())
        return manifest

    def _stale(
        self,
        state: TagState,
        media_type: str,
        manifest: Manifest,
        repository: str,
        tag: str,
        reason: str,
    ) -> Manifest:
        self.stats["stale"] += 1
        log.warn(
            "serving {repository}:{tag} stale from the cache: {reason}",
            repository=repository,
            tag=tag,
            reason=reason,
        )
        state.checked[media_type] = self._reactor.seconds()
        return manifest

    def _record_tag(self, repository: str, tag: str, manifest: Manifest, now: float) -> None:
        state = self._tag_state(repository, tag)
        state.variants.pop(manifest.media_type, None)
        state.variants[manifest.media_type] = str(manifest.digest)
        state.checked[manifest.media_type] = now
        self.store.write_tag(self.upstream.name, repository, tag, state.variants)

    def _forget_tag(self, repository: str, tag: str) -> None:
        self._tags.pop((repository, tag), None)
        self.store.delete_tag(self.upstream.name, repository, tag)

    async def _fetch_manifest(
        self, repository: str, reference: str, accept: Accept, expected: Digest | None
    ) -> Manifest:
        self.stats["manifest_fetches"] += 1
        response = await self.upstream.request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            repository,
            {"accept": accept.header()},
            unbuffered=True,
        )
        if response.code != 200:
            await _discard(response)
            raise self.upstream.error_for(response, "manifest")
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_manifest:
            await _discard(response)
            raise ManifestInvalid(
                "the upstream manifest is larger than the configured maximum",
                {"size": response.length, "max": self._max_manifest},
            )
        data = await _read_limited(response, self._max_manifest, self._reactor, self._read_timeout)
        media_type = response.headers.getRawHeaders("content-type", [""])[0]
        media_type = media_type.split(";", 1)[0].strip().lower()
        if not media_type or media_type == "application/json":
            media_type = _media_type_of(data)
        digest = Digest.of(data, expected.algorithm if expected else "sha256")
        header = response.headers.getRawHeaders("docker-content-digest", [""])[0]
        if (expected is not None and digest != expected) or (
            expected is None and header and header != str(digest)
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
        manifest = Manifest(digest, data, media_type)
        self.store.write_manifest(digest, data, media_type)
        self._link(repository, digest, MANIFEST)
        self._link_references(repository, manifest)
        self._remember(manifest)
        if self.reaper is not None:
            self.reaper.added(MANIFEST, str(digest), len(data), manifest_references(data))
        log.info(
            "manifest {repository}@{digest} from {upstream}",
            repository=repository,
            digest=str(digest),
            upstream=self.upstream.name,
        )
        return manifest

    # -- tags and catalog ------------------------------------------------------------

    async def tags(self, name: str, n: int | None, last: str | None) -> tuple[bytes, str | None]:
        """``tags/list``: the upstream's full list (following its own pages), stored, then
        paginated here in lexical order (distribution 2.8 ignores ``n``); the last full
        list seen when the upstream is down."""
        repository = self.upstream.repository(name)
        try:
            tags = await self._upstream_tags(repository, name)
        except RegistryError as error:
            cached = self.store.read_tag_list(self.upstream.name, repository)
            if cached is None or isinstance(error, NameUnknown):
                raise
            log.warn(
                "serving the tag list of {name} stale: {reason}", name=name, reason=error.message
            )
            tags = cached
        else:
            self.store.write_tag_list(self.upstream.name, repository, tags)
        page, link = paginate(sorted(set(tags)), n, last, f"/v2/{name}/tags/list")
        return json.dumps({"name": name, "tags": page}).encode(), link

    async def _upstream_tags(self, repository: str, name: str) -> list[str]:
        tags: list[str] = []
        path: str | None = f"/v2/{repository}/tags/list"
        for _ in range(MAX_TAG_PAGES):
            assert path is not None
            response = await self.upstream.request("GET", path, repository)
            body = await _read_limited(
                response, self._max_manifest, self._reactor, self._read_timeout
            )
            if response.code == 404:
                raise NameUnknown("repository unknown to the upstream registry", {"name": name})
            if response.code != 200:
                raise self.upstream.error_for(response, "repository")
            try:
                page = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                page = None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise Unavailable("the upstream sent an invalid tag list", {"name": name})
            tags.extend(page)
            path = _next_path(response, repository)
            if path is None:
                return tags
        raise Unavailable("the upstream's tag list has too many pages", {"name": name})

    async def repositories(self) -> list[str]:
        """The repositories of this upstream in the cache (a directory walk, in a
        thread)."""
        names: list[str] = await deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), self.store.catalog, self.upstream.name
        )
        return names


MAX_NS_LOGGED = 256  # distinct unmatched ?ns= values logged (then only counted)


class Mirrors:
    """The caches of every upstream, and how a request picks one: containerd's
    ``?ns=<registry>`` first, then a first path component that is an upstream's name or
    alias (``/v2/ghcr.io/owner/image/...``, podman's ``mirror:5000/ghcr``), otherwise
    the default upstream (the Docker daemon's ``registry-mirrors`` traffic).

    An ``ns`` naming no upstream: with a ``single`` upstream (only ``proxy.remoteurl``)
    that is not a well-known public registry, it is served by that upstream, as
    registry:2 does (it ignores ``ns``); otherwise it is refused with 404, since two
    registries' ``owner/name`` are different images."""

    def __init__(self, caches: list[Cache], *, single: bool = False) -> None:
        self.caches = caches
        self.default = caches[0]
        self.by_name: dict[str, Cache] = {}
        for cache in caches:
            for label in (cache.upstream.name, *cache.upstream.config.aliases):
                self.by_name[label] = cache
        for cache in caches:  # an upstream is also called by its URL's host
            parts = urlsplit(cache.upstream.config.url)
            hosts = [parts.netloc, parts.hostname or ""]
            if cache.upstream.config.docker_hub:
                hosts.extend(DOCKER_HUB_HOSTS)
            for host in hosts:
                if host:
                    self.by_name.setdefault(host, cache)
        default = self.default.upstream
        host = urlsplit(default.config.url).netloc
        self.any_ns = (
            single
            and len(caches) == 1
            and not default.config.docker_hub
            and not is_well_known_registry(host)
        )
        self._ns_seen: set[str] = set()
        self.stats: Counter[str] = Counter()  # ns_served, ns_refused: read by metrics

    def pick(self, name: str, ns: str | None = None) -> tuple[Cache, str]:
        if ns is not None:
            cache = self.by_name.get(ns)
            if cache is not None:
                return cache, name
            return self._unmatched_ns(ns), name
        first, _, rest = name.partition("/")
        if rest:
            cache = self.by_name.get(first)
            if cache is not None:
                return cache, rest
        return self.default, name

    def _unmatched_ns(self, ns: str) -> Cache:
        shown = ns[:100]
        first = shown not in self._ns_seen and len(self._ns_seen) < MAX_NS_LOGGED
        if first:
            self._ns_seen.add(shown)
        if self.any_ns:
            self.stats["ns_served"] += 1
            if first:
                log.info(
                    "?ns={ns} served by {upstream}, this mirror's only upstream (as registry:2 "
                    "does; logged once)",
                    ns=shown,
                    upstream=self.default.upstream.name,
                )
            return self.default
        self.stats["ns_refused"] += 1
        names = sorted(c.upstream.name for c in self.caches)
        if first:
            if len(self.caches) == 1:
                fix = (
                    f"{names[0]} is a public registry whose repositories are not {shown}'s; "
                    f"add an upstream for {shown} under regmirror.upstreams"
                )
            else:
                fix = (
                    f"add {shown} to the aliases of the upstream that mirrors it, or add an "
                    "upstream for it under regmirror.upstreams"
                )
            log.warn(
                "?ns={ns} names no upstream of this mirror ({upstreams}): answered 404; {fix} "
                "(logged once)",
                ns=shown,
                upstreams=", ".join(names),
                fix=fix,
            )
        raise NameUnknown(
            f"this mirror has no upstream for ns={shown}",
            {"ns": shown, "upstreams": names},
        )

    def in_use(self, key: str) -> bool:
        return self.default.in_use(key)  # readers and fetches are shared

    def forget(self, kind: str, key: str) -> None:
        for cache in self.caches:
            cache.forget(kind, key)

    async def catalog(self, n: int | None, last: str | None) -> tuple[bytes, str | None]:
        names: list[str] = []
        for cache in self.caches:
            found = await cache.repositories()
            if cache is self.default:
                names.extend(found)
            else:
                names.extend(f"{cache.upstream.name}/{name}" for name in found)
        page, link = paginate(sorted(set(names)), n, last, "/v2/_catalog")
        return json.dumps({"repositories": page}).encode(), link


def paginate(
    items: list[str], n: int | None, last: str | None, path: str
) -> tuple[list[str], str | None]:
    if last is not None:
        items = [i for i in items if i > last]
    if n is None or len(items) <= n:
        return items, None
    page = items[:n]
    query = urlencode({"n": n, "last": page[-1]}) if page else urlencode({"n": n})
    return page, f'<{path}?{query}>; rel="next"'


def _next_path(response: _Response, repository: str) -> str | None:
    """The next page of an upstream tag list, from its ``Link`` header (only on the
    same repository: the query is all we take from it)."""
    link = response.headers.getRawHeaders("link", [None])[0]
    if not link or "<" not in link:
        return None
    target = link.split("<", 1)[1].split(">", 1)[0]
    query = target.split("?", 1)[1] if "?" in target else ""
    params = [(k, v) for k, v in parse_qsl(query) if k in ("n", "last")]
    if not params:
        return None
    return f"/v2/{repository}/tags/list?{urlencode(params)}"


def _media_type_of(data: bytes) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    media_type = parsed.get("mediaType") if isinstance(parsed, dict) else None
    if isinstance(media_type, str) and media_type:
        return media_type
    if isinstance(parsed, dict) and "manifests" in parsed:
        return "application/vnd.oci.image.index.v1+json"
    return "application/vnd.oci.image.manifest.v1+json"


class _Collector(Protocol):
    """Collects a small body, at most ``limit`` bytes; cut after ``idle`` seconds of
    silence when given a clock."""

    def __init__(
        self,
        limit: int,
        done: Deferred[bytes],
        clock: IReactorTime | None = None,
        idle: float = 0.0,
    ) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._done = done
        self._timer: IDelayedCall | None = None
        self._silent = False
        if clock is not None and idle > 0:
            self._idle = idle
            self._timer = clock.callLater(idle, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._silent = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle)
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._silent:
            self._done.errback(Unavailable("the upstream stopped sending the response"))
        elif self._size > self._limit:
            self._done.errback(
                ManifestInvalid("the upstream response is larger than the configured maximum")
            )
        elif reason.check(ResponseDone):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(Unavailable("the upstream connection broke"))


async def _read_limited(
    response: _Response, limit: int, clock: IReactorTime | None = None, idle: float = 0.0
) -> bytes:
    d: Deferred[bytes] = Deferred()
    response.deliverBody(_Collector(limit, d, clock, idle))
    return await d


async def _discard(response: _Response) -> None:
    d: Deferred[bytes] = Deferred()
    response.deliverBody(_Collector(0, d))
    try:
        await d
    except RegistryError:
        pass


UPSTREAM_READ_SIZE = 1024 * 1024
PIECE = 128 * 1024


def _read_more_at_once(transport: object) -> None:
    """Let the TCP connection under an upstream blob response read 1 MiB per call
    instead of Twisted's 64 KiB. With many clients reading the fetch, the reactor sends
    up to 128 KiB per client per loop; reading 64 KiB per loop from the upstream would
    starve the download (one upstream read for 32 client writes). The body is handed
    on in pieces of 128 KiB (see ``_BlobBody.dataReceived``)."""
    for _ in range(4):  # TransportProxyProducer -> (TLS ->) tcp.Client
        if isinstance(transport, tcp.Connection):
            transport.bufferSize = max(transport.bufferSize, UPSTREAM_READ_SIZE)
            return
        transport = getattr(transport, "_producer", None) or getattr(transport, "transport", None)


class _BlobBody(Protocol):
    """Receives an upstream blob body into its fetch; cut after ``idle`` seconds of
    silence."""

    def __init__(self, fetch: BlobFetch, reactor: IReactorTime, idle: float) -> None:
        self._fetch = fetch
        self._reactor = reactor
        self._idle = idle
        self._last = reactor.seconds()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        if self.transport is not None:
            self._fetch.attach(self.transport)  # type: ignore[arg-type]
            _read_more_at_once(self.transport)
        if self._idle > 0:
            self._timer = self._reactor.callLater(self._idle, self._check_idle)
        if self._fetch.size == 0:
            self._fetch.write(b"")

    def _check_idle(self) -> None:
        silent = self._reactor.seconds() - self._last
        if silent >= self._idle:
            self._timer = None
            self._fetch.fail(TimeoutError(f"upstream sent nothing for {silent:.0f} s"))
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
        else:
            self._timer = self._reactor.callLater(self._idle - silent, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        self._last = self._reactor.seconds()
        if len(data) <= PIECE:
            self._fetch.write(data)
        else:
            # One copy into pieces that every reader shares: a reader's transport then
            # holds at most one piece (it is paused after it), which bounds memory with
            # many readers whatever the read size.
            view = memoryview(data)
            for start in range(0, len(data), PIECE):
                self._fetch.write(bytes(view[start : start + PIECE]))
        if self._fetch.state is State.FAILED and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if reason.check(ResponseDone):
            self._fetch.finish()
        else:
            self._fetch.fail(reason.value)
