"""Warming one tag through the mirror's own paths, as a client pull would.

The tag is asked of the ``Cache`` like a client's ``GET /v2/<name>/manifests/<tag>``:
within its freshness window it is answered from the cache; past it one ``HEAD``
revalidates it, and only a changed digest is fetched. Then the manifest is walked:
an index's children for the policy's platforms (by digest), and every blob each image
references, through ``Cache.blob`` — so a blob is fetched once, verified, committed and
counted exactly as for a client, and content already cached costs no upstream request
(it is only marked as used, which keeps it from expiring while the policy matches).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError
from regmirror.domain.media import ANY, INDEX_TYPES
from regmirror.domain.references import manifest_references
from regmirror.fetch.blobfetch import FetchFailed
from regmirror.logs import get_logger
from regmirror.mirror.cache import Cache
from regmirror.mirror.manifests import Manifest
from regmirror.mirror.prefetch.matching import platform_matches
from regmirror.mirror.sources import CommittedBlob, FollowedFetch, PassThrough
from regmirror.upstream.bodies import discard

log = get_logger()

MAX_DEPTH = 2  # an index of indexes at most


class Paused(Exception):
    """The rate-limit budget is spent: prefetching waits for the next run."""


class TooBig(Exception):
    """The blob cannot fit in the cache quota: it is not prefetched."""


@attrs.define
class Tally:
    """What one run did (a status page and the metrics read it)."""

    started: float
    finished: float | None = None
    outcome: str = "running"  # then ok | failed (some items) | paused | error
    tags_matched: int = 0
    tags_checked: int = 0
    tags_changed: int = 0
    manifests_fetched: int = 0
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    failures: int = 0

    COUNTS = (
        "tags_matched",
        "tags_checked",
        "tags_changed",
        "manifests_fetched",
        "blobs_fetched",
        "bytes_fetched",
        "failures",
    )

    def as_json(self) -> dict[str, object]:
        return attrs.asdict(self)


class Warmer:
    """Warms the tags of one upstream's ``cache``: the children of an index for
    ``platforms`` (empty: all), blobs ``slots`` at a time. ``exhausted()`` is asked
    before each manifest that has to be fetched (what Docker Hub counts)."""

    def __init__(
        self,
        cache: Cache,
        slots: DeferredSemaphore,
        platforms: Sequence[str],
        exhausted: Callable[[], bool],
    ) -> None:
        self._cache = cache
        self._slots = slots
        self._platforms = tuple(platforms)
        self._exhausted = exhausted

    async def tag(self, name: str, tag: str, tally: Tally) -> Manifest:
        """Keep ``name:tag`` warm, and answer the manifest it resolves to; raises what
        stops it (``Paused``, registry errors). Failed blobs are counted in ``tally``
        and the others still fetched."""
        before = self._cache.cached_tag(name, tag, ANY)
        manifest = await self._cache.manifest(name, tag, ANY)
        tally.tags_checked += 1
        if before is None or before.digest != manifest.digest:
            tally.tags_changed += 1
            tally.manifests_fetched += 1
            log.info(
                "prefetch: {name}:{tag} is {digest} ({was})",
                name=name,
                tag=tag,
                digest=str(manifest.digest),
                was="new" if before is None else f"was {before.digest}",
            )
        await self._walk(name, manifest, tally, 0)
        return manifest

    async def _walk(self, name: str, manifest: Manifest, tally: Tally, depth: int) -> None:
        if manifest.media_type in INDEX_TYPES:
            if depth >= MAX_DEPTH:
                return
            for digest in self._children(manifest):
                cached = self._cache.cached_manifest(digest) is not None
                if not cached and self._exhausted():
                    raise Paused()
                child = await self._cache.manifest(name, digest, ANY)
                if not cached:
                    tally.manifests_fetched += 1
                await self._walk(name, child, tally, depth + 1)
            return
        blobs = manifest_references(manifest.data)
        results = await gatherResults(
            [Deferred.fromCoroutine(self._blob_counted(name, d, tally)) for d in blobs]
        )
        tally.failures += results.count(False)

    def _children(self, index: Manifest) -> list[Digest]:
        try:
            entries = json.loads(index.data).get("manifests") or []
        except (ValueError, AttributeError):
            return []
        out = []
        for entry in entries:
            if not isinstance(entry, dict) or not platform_matches(
                entry.get("platform"), self._platforms
            ):
                continue
            try:
                out.append(Digest.parse(str(entry.get("digest", ""))))
            except RegistryError:
                continue
        return out

    async def _blob_counted(self, name: str, digest: Digest, tally: Tally) -> bool:
        """Fetch one blob; False (logged) when it failed."""
        await self._slots.acquire()
        try:
            fetched = await self._blob(name, digest)
        except TooBig:
            return False
        except (RegistryError, FetchFailed) as e:
            log.warn(
                "prefetch: blob {digest} of {name} failed: {reason}",
                digest=str(digest),
                name=name,
                reason=e.message if isinstance(e, RegistryError) else str(e) or type(e).__name__,
            )
            return False
        except Exception:
            log.failure("prefetch: blob {digest} of {name} failed", digest=str(digest), name=name)
            return False
        finally:
            self._slots.release()
        if fetched:
            tally.blobs_fetched += 1
            tally.bytes_fetched += fetched
        return True

    async def _blob(self, name: str, digest: Digest) -> int:
        """The blob through the mirror's blob path, drained and released; the bytes it
        took from upstream (0: it was cached)."""
        cached = self._cache.has_blob(digest)
        source = await self._cache.blob(name, digest)
        match source:
            case CommittedBlob(fd=fd, size=size, release=release):
                os.close(fd)
                release()
                return 0 if cached else size
            case FollowedFetch(fetch=fetch, fd=fd, size=size, release=release):
                os.close(fd)
                try:
                    await fetch.when_committed()
                finally:
                    release()
                return size
            case PassThrough(response=response, size=size):
                await discard(response)
                log.warn(
                    "prefetch: blob {digest} of {name} ({size} bytes) cannot fit in the "
                    "cache quota: not prefetched",
                    digest=str(digest),
                    name=name,
                    size=size,
                )
                raise TooBig()
