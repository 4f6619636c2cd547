"""The private-repository rule: when an upstream is reached with credentials, content
cached for one repository is served for another only once that one is known to
reference it.

Known means linked: the repository's manifest that lists it was cached, a fetch for it
committed, or the upstream said so to one ``HEAD``. Links live in the store
(``Store.link_manifest``/``link_blob``/``has_link``); those found are remembered here.
Public upstreams skip all of this: their content is the same for everyone.
"""

from __future__ import annotations

from regmirror.domain.digest import Digest
from regmirror.domain.kinds import Kind
from regmirror.domain.media import INDEX_TYPES
from regmirror.domain.references import manifest_references
from regmirror.fetch.inflight import InFlight
from regmirror.storage.store import Store
from regmirror.upstream.remote import RemoteRegistry


class Visibility:
    def __init__(self, store: Store, remote: RemoteRegistry, inflight: InFlight) -> None:
        self._store = store
        self._remote = remote
        self._inflight = inflight
        # digest -> {(repository, kind)} known to reference it (private upstreams only)
        self._links: dict[Digest, set[tuple[str, Kind]]] = {}

    def visible(self, repository: str, digest: Digest, kind: Kind) -> bool:
        """Whether cached content may be served for ``repository`` without asking."""
        return not self._remote.authenticated or self._linked(repository, digest, kind)

    async def check_reference(self, repository: str, digest: Digest, kind: Kind) -> None:
        """Return once ``repository`` may be served the cached ``digest``: at once when
        it is visible (or, for a blob, not cached at all: its fetch asks the upstream for
        this repository anyway), else when the upstream confirmed it (one HEAD), which
        links it. Raises the upstream's refusal."""
        if self.visible(repository, digest, kind):
            return
        if (
            kind is Kind.BLOB
            and self._store.blob_size(digest) is None
            and self._inflight.fetch(digest) is None
        ):
            return
        await self._remote.check_exists(repository, digest, kind)
        self.link(repository, digest, kind)

    def link(self, repository: str, digest: Digest, kind: Kind) -> None:
        """``repository`` references ``digest`` (recorded in the store)."""
        if kind is Kind.MANIFEST:
            self._store.link_manifest(self._remote.name, repository, digest)
        else:
            self._store.link_blob(self._remote.name, repository, digest)
        self._links.setdefault(digest, set()).add((repository, kind))

    def link_references(self, repository: str, media_type: str, data: bytes) -> None:
        """A manifest of ``repository`` was cached: what it lists is its too."""
        if not self._remote.authenticated:
            return
        kind = Kind.MANIFEST if media_type in INDEX_TYPES else Kind.BLOB
        for ref in manifest_references(data):
            self.link(repository, ref, kind)

    def forget(self, digest: Digest) -> None:
        """``digest`` was removed from the store, its links with it."""
        self._links.pop(digest, None)

    def _linked(self, repository: str, digest: Digest, kind: Kind) -> bool:
        if (repository, kind) in self._links.get(digest, ()):
            return True
        if self._store.has_link(self._remote.name, repository, digest, kind):
            self._links.setdefault(digest, set()).add((repository, kind))
            return True
        return False
