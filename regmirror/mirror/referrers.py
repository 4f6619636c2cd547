"""Referrers (OCI 1.1): which signatures, SBOMs and attestations name a manifest as
their ``subject``, answered as an OCI image index, ``200`` even when it is empty.

The list comes from the upstream's referrers API when it has one; else from the
referrers tag schema's fallback index (tag ``sha256-<hex>`` in the same repository,
pushed by clients beside their artifacts for such registries); else it is empty. It is
cached like a tag (new referrers appear upstream over time): served from the cache
within the upstream's tag freshness window (``TagFreshness``, so one upstream request
per window however many clients ask, on every replica), revalidated past it by one
request shared by all who wait (``SingleFlight``), and served stale when the upstream
cannot answer. ``artifactType`` filtering is done here, on the full cached list.

Non-empty lists are kept in the store per repository (``Store.write_referrers``), so a
restarted mirror serves them with the upstream down; the store drops one with its
subject manifest. Empty lists are kept in memory only: asking for random digests must
not fill the disk. Like tags, a list is kept per repository as the upstream named it,
so a private upstream's answer for one repository is never served for another.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict

import attrs

from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError
from regmirror.domain.referrers import (
    Descriptor,
    index_descriptors,
    index_document,
    of_artifact_types,
)
from regmirror.fetch.singleflight import SingleFlight
from regmirror.logs import get_logger
from regmirror.mirror.freshness import TagFreshness, TagRef
from regmirror.reactor import ReactorTime
from regmirror.storage.store import Store
from regmirror.upstream.remote import RemoteRegistry

log = get_logger()

# The "media type" under which a referrers list's checks are kept in TagFreshness; the
# list's TagRef names ``referrers/<digest>``, which no tag can be (tags have no "/").
CHECKED_AS = "referrers"
MAX_IN_MEMORY = 10_000  # referrers lists kept in memory (the non-empty ones are on disk)

Key = tuple[str, Digest]  # (repository as the upstream names it, subject)


@attrs.frozen
class ReferrerList:
    """The full (unfiltered) referrers of a subject, and where they were found:
    ``api`` (the upstream's referrers API), ``tag`` (the fallback tag) or ``none``."""

    descriptors: tuple[Descriptor, ...]
    source: str

    def to_json(self) -> bytes:
        return json.dumps({"source": self.source, "manifests": self.descriptors}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ReferrerList | None:
        descriptors = index_descriptors(data)
        try:
            source = json.loads(data).get("source")
        except (ValueError, AttributeError):
            return None
        if descriptors is None or source not in ("api", "tag"):
            return None
        return cls(descriptors, source)


@attrs.frozen
class ReferrersAnswer:
    """What a client is sent: the index, and whether ``artifactType`` filtered it (then
    the response says so in ``OCI-Filters-Applied``)."""

    body: bytes
    filtered: bool


class Referrers:
    """The referrers lists of one upstream's repositories; ``window`` is its tag
    freshness."""

    def __init__(
        self,
        clock: ReactorTime,
        store: Store,
        remote: RemoteRegistry,
        freshness: TagFreshness,
        window: float,
        stats: Counter[str],
    ) -> None:
        self._clock = clock
        self._store = store
        self._remote = remote
        self._freshness = freshness
        self.window = window
        self._stats = stats
        self._flight: SingleFlight[ReferrerList] = SingleFlight()
        self._lists: OrderedDict[Key, ReferrerList] = OrderedDict()

    async def answer(
        self, repository: str, subject: Digest, artifact_types: frozenset[str]
    ) -> ReferrersAnswer:
        """The index for ``subject`` (only the ``artifact_types`` given, if any)."""
        found = await self.referrers(repository, subject)
        if not artifact_types:
            return ReferrersAnswer(index_document(found.descriptors), False)
        return ReferrersAnswer(
            index_document(of_artifact_types(found.descriptors, artifact_types)), True
        )

    async def referrers(self, repository: str, subject: Digest) -> ReferrerList:
        key = (repository, subject)
        cached = self._load(key)
        if cached is not None and self._freshness.fresh(self._ref(key), CHECKED_AS, self.window):
            self._stats["referrers_hits"] += 1
            return cached
        return await self._flight.run(key, lambda: self._revalidate(key))

    async def _revalidate(self, key: Key) -> ReferrerList:
        repository, subject = key
        self._stats["referrers_checks"] += 1
        try:
            found = await self._ask(repository, subject)
        except RegistryError as error:
            cached = self._load(key)
            if cached is None:
                raise
            self._stats["referrers_stale"] += 1
            log.warn(
                "serving the referrers of {repository}@{digest} stale from the cache: {reason}",
                repository=repository,
                digest=str(subject),
                reason=error.message,
            )
            self._freshness.checked(self._ref(key), CHECKED_AS, self._clock.seconds())
            return cached
        self._record(key, found)
        return found

    async def _ask(self, repository: str, subject: Digest) -> ReferrerList:
        """The upstream's API; else its fallback tag; else nothing."""
        listed = await self._remote.referrers(repository, subject)
        if listed is not None:
            return ReferrerList(listed, "api")
        tagged = await self._remote.referrers_tag(repository, subject)
        if tagged is not None:
            return ReferrerList(tagged, "tag")
        return ReferrerList((), "none")

    def _ref(self, key: Key) -> TagRef:
        return TagRef(self._remote.name, key[0], f"referrers/{key[1]}")

    def _load(self, key: Key) -> ReferrerList | None:
        found = self._lists.get(key)
        if found is not None:
            self._lists.move_to_end(key)
            return found
        data = self._store.read_referrers(self._remote.name, *key)
        found = ReferrerList.from_json(data) if data is not None else None
        if found is not None:
            self._remember(key, found)
        return found

    def _remember(self, key: Key, found: ReferrerList) -> None:
        self._lists[key] = found
        self._lists.move_to_end(key)
        while len(self._lists) > MAX_IN_MEMORY:
            self._lists.popitem(last=False)

    def _record(self, key: Key, found: ReferrerList) -> None:
        self._remember(key, found)
        if found.descriptors:
            self._store.write_referrers(self._remote.name, *key, found.to_json())
        else:
            self._store.delete_referrers(self._remote.name, *key)
        self._freshness.checked(self._ref(key), CHECKED_AS, self._clock.seconds())
        log.info(
            "{count} referrers of {repository}@{digest} from {upstream} ({source})",
            count=len(found.descriptors),
            repository=key[0],
            digest=str(key[1]),
            upstream=self._remote.name,
            source=found.source,
        )

    def forget_subject(self, subject: Digest) -> None:
        """The manifest ``subject`` was removed (the store dropped its lists): its
        lists are asked for again."""
        for key in [k for k in self._lists if k[1] == subject]:
            del self._lists[key]
            self._freshness.forget(self._ref(key))
