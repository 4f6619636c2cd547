"""Several upstreams, and how a request picks one.

containerd's ``?ns=<registry>`` first, then a first path component that is an
upstream's name or alias (``/v2/ghcr.io/owner/image/...``, podman's ``mirror:5000/
ghcr``), otherwise the default upstream (the Docker daemon's ``registry-mirrors``
traffic).
"""

from __future__ import annotations

from collections import Counter
from urllib.parse import urlsplit

from regmirror.config.model import routing_table
from regmirror.domain.digest import Digest
from regmirror.domain.errors import NameUnknown
from regmirror.domain.kinds import Kind
from regmirror.domain.names import is_well_known_registry
from regmirror.domain.pagination import catalog_page
from regmirror.fetch.inflight import InFlight
from regmirror.logs import get_logger
from regmirror.mirror.cache import Cache

log = get_logger()

MAX_NS_LOGGED = 256  # distinct unmatched ?ns= values logged (then only counted)


class Mirrors:
    """The caches of every upstream, and how a request picks one.

    An ``ns`` naming no upstream: with a ``single`` upstream (only ``proxy.remoteurl``)
    that is not a well-known public registry, it is served by that upstream, as
    registry:2 does (it ignores ``ns``); otherwise it is refused with 404, since two
    registries' ``owner/name`` are different images."""

    def __init__(self, caches: list[Cache], *, single: bool = False) -> None:
        self.caches = caches
        self.default = caches[0]
        if any(cache.inflight is not self.default.inflight for cache in caches):
            raise ValueError("the caches of all upstreams share one InFlight")
        table = routing_table([cache.upstream.config for cache in caches])
        self.by_name: dict[str, Cache] = {label: caches[i] for label, i in table.items()}
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

    @property
    def inflight(self) -> InFlight:
        """What is fetched and read now: one for every upstream."""
        return self.default.inflight

    def in_use(self, digest: Digest) -> bool:
        return self.inflight.in_use(digest)

    def forget(self, kind: Kind, digest: Digest) -> None:
        for cache in self.caches:
            cache.forget(kind, digest)

    def forget_tag(self, upstream: str, repository: str, tag: str) -> None:
        """A tag of ``upstream``'s ``repository`` (as the store names them) was purged."""
        for cache in self.caches:
            if cache.upstream.name == upstream:
                cache.forget_tag(repository, tag)

    async def catalog(self, n: int | None, last: str | None) -> tuple[bytes, str | None]:
        names: list[str] = []
        for cache in self.caches:
            found = await cache.repositories()
            if cache is self.default:
                names.extend(found)
            else:
                names.extend(f"{cache.upstream.name}/{name}" for name in found)
        return catalog_page(names, n, last)
