"""The distribution API of one upstream registry, as the mirror uses it: every ``/v2/``
URL, every header read from an answer, and the errors a client gets for an upstream's
non-success answer. Nothing above this module formats an upstream URL or reads an
upstream header.

``Upstream`` (``regmirror.upstream.client``) carries the requests: authentication,
tokens, redirects, the circuit breaker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlencode, urlsplit

import attrs
from treq.response import _Response
from twisted.web.iweb import UNKNOWN_LENGTH

from regmirror.config import UpstreamConfig
from regmirror.domain.digest import Digest
from regmirror.domain.errors import (
    BlobUnknown,
    Denied,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from regmirror.domain.kinds import Kind
from regmirror.domain.media import ALL_MANIFEST_TYPES, OCI_INDEX, Accept, manifest_media_type
from regmirror.domain.names import normalize_docker_hub
from regmirror.domain.pagination import next_page_query
from regmirror.domain.referrers import Descriptor, fallback_tag, index_descriptors
from regmirror.logs import get_logger
from regmirror.reactor import ReactorTime
from regmirror.upstream.bodies import DRAIN_LIMIT, discard, read_limited
from regmirror.upstream.breaker import BreakerState
from regmirror.upstream.client import Upstream

log = get_logger()

MAX_TAG_PAGES = 100
MAX_REFERRER_PAGES = 100
# What a registry without the referrers API answers it with (distribution 2.8: a plain
# text 404; others 400, 405 UNSUPPORTED or 501): then the fallback tag is asked.
NO_REFERRERS_API = frozenset({400, 404, 405, 501})
INDEX_ONLY = Accept(frozenset({OCI_INDEX}))

What = Kind | Literal["repository"]


@attrs.frozen
class BlobResponse:
    """An upstream's 200 to a blob GET, its body not read yet; ``size`` is None when
    it sent no ``Content-Length``."""

    response: _Response
    size: int | None

    async def discard(self) -> None:
        await discard(self.response)


@attrs.frozen
class ManifestHead:
    """An upstream's answer to a manifest HEAD: its status, and the digest it names
    (empty when it named none)."""

    code: int
    digest: str


@attrs.frozen
class UpstreamManifest:
    """A manifest as the upstream sent it, not verified yet: ``digest`` is what its
    ``Docker-Content-Digest`` header claims (empty when absent)."""

    data: bytes
    media_type: str
    digest: str


class RemoteRegistry:
    """One upstream registry's API: blobs, manifests and tag lists of its repositories.
    Bodies other than blobs are read up to ``max_body`` bytes, each cut after
    ``read_timeout`` seconds of silence."""

    def __init__(
        self,
        upstream: Upstream,
        clock: ReactorTime,
        *,
        read_timeout: float = 60.0,
        max_body: int = 4 * 1024 * 1024,
    ) -> None:
        self._upstream = upstream
        self._clock = clock
        self.read_timeout = read_timeout
        self.max_body = max_body
        self.ratelimit_remaining: str | None = None  # Docker Hub's header, last seen
        self.ratelimit_limit: str | None = None  # and its ratelimit-limit

    # -- what the layers above ask of an upstream ------------------------------------

    @property
    def name(self) -> str:
        return self._upstream.name

    @property
    def config(self) -> UpstreamConfig:
        return self._upstream.config

    @property
    def authenticated(self) -> bool:
        """Reached with credentials: its content may be private to some repositories."""
        return self._upstream.authenticated

    @property
    def breaker_open(self) -> bool:
        return self._upstream.breaker_open

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker, and the upstream's last known reachability."""
        return self._upstream.breaker_state

    def repository(self, name: str) -> str:
        """The name to use upstream (official Docker Hub images live in ``library/``)."""
        return normalize_docker_hub(name) if self.config.docker_hub else name

    # -- blobs -----------------------------------------------------------------------

    async def get_blob(self, repository: str, digest: Digest) -> BlobResponse:
        """The upstream's answer to a blob GET, its body not read yet (errors raised)."""
        response = await self._request(
            "GET", f"/v2/{repository}/blobs/{digest}", repository, unbuffered=True
        )
        if response.code != 200:
            await discard(response)
            raise error_for(response, Kind.BLOB, self.name)
        size = None if response.length is UNKNOWN_LENGTH else int(response.length)
        return BlobResponse(response, size)

    async def blob_size(self, repository: str, digest: Digest) -> int:
        """A blob's size from a HEAD (nothing downloaded)."""
        response = await self._request("HEAD", f"/v2/{repository}/blobs/{digest}", repository)
        await discard(response)
        if response.code != 200:
            raise error_for(response, Kind.BLOB, self.name)
        length = response.headers.getRawHeaders("content-length", [""])[0]
        if not length.isdigit():
            raise Unavailable("the upstream sent no blob size", {"digest": str(digest)})
        return int(length)

    async def check_exists(self, repository: str, digest: Digest, kind: Kind) -> None:
        """Raise the client's error unless ``repository`` has ``digest`` upstream (a
        HEAD)."""
        what = "manifests" if kind is Kind.MANIFEST else "blobs"
        headers = {"accept": ALL_MANIFEST_TYPES} if kind is Kind.MANIFEST else None
        response = await self._request(
            "HEAD", f"/v2/{repository}/{what}/{digest}", repository, headers
        )
        await discard(response)
        if response.code != 200:
            raise error_for(response, kind, self.name)

    # -- manifests -------------------------------------------------------------------

    async def head_manifest(self, repository: str, tag: str, accept: Accept) -> ManifestHead:
        response = await self._request(
            "HEAD", f"/v2/{repository}/manifests/{tag}", repository, {"accept": accept.header()}
        )
        await discard(response)
        return ManifestHead(response.code, _header(response, "docker-content-digest"))

    async def get_manifest(
        self, repository: str, reference: str, accept: Accept
    ) -> UpstreamManifest:
        response = await self._request(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            repository,
            {"accept": accept.header()},
            unbuffered=True,
        )
        if response.code != 200:
            await discard(response)
            raise error_for(response, Kind.MANIFEST, self.name)
        if response.length is not UNKNOWN_LENGTH and response.length > self.max_body:
            await discard(response)
            raise ManifestInvalid(
                "the upstream manifest is larger than the configured maximum",
                {"size": response.length, "max": self.max_body},
            )
        data = await self._read(response)
        media_type = manifest_media_type(_header(response, "content-type"), data)
        return UpstreamManifest(data, media_type, _header(response, "docker-content-digest"))

    # -- tag lists -------------------------------------------------------------------

    async def tag_list(self, repository: str, name: str) -> list[str]:
        """Every tag of ``repository``, following the upstream's own pages (``name`` is
        what the client called it, for errors)."""
        tags: list[str] = []
        path = f"/v2/{repository}/tags/list"
        for _ in range(MAX_TAG_PAGES):
            response = await self._request("GET", path, repository)
            body = await self._read(response)
            if response.code == 404:
                raise NameUnknown("repository unknown to the upstream registry", {"name": name})
            if response.code != 200:
                raise error_for(response, "repository", self.name)
            try:
                page = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                page = None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise Unavailable("the upstream sent an invalid tag list", {"name": name})
            tags.extend(page)
            query = next_page_query(response.headers.getRawHeaders("link", [None])[0])
            if query is None:
                return tags
            path = f"/v2/{repository}/tags/list?{urlencode(query)}"
        raise Unavailable("the upstream's tag list has too many pages", {"name": name})

    # -- referrers -------------------------------------------------------------------

    async def referrers(self, repository: str, subject: Digest) -> tuple[Descriptor, ...] | None:
        """What the upstream's referrers API lists for ``subject`` (unfiltered, every
        page followed), or None when it has no such API."""
        base = f"/v2/{repository}/referrers/{subject}"
        path = base
        found: list[Descriptor] = []
        for _ in range(MAX_REFERRER_PAGES):
            response = await self._request("GET", path, repository, {"accept": OCI_INDEX})
            if response.code in NO_REFERRERS_API and path == base:
                await discard(response, DRAIN_LIMIT)  # small: keep the connection
                return None
            if response.code != 200:
                await discard(response)
                raise error_for(response, Kind.MANIFEST, self.name)
            page = index_descriptors(await self._read(response))
            if page is None:
                raise Unavailable(
                    "the upstream sent an invalid referrers index", {"digest": str(subject)}
                )
            found.extend(page)
            query = _next_page(response.headers.getRawHeaders("link", [None])[0], base)
            if query is None:
                return tuple(found)
            path = f"{base}?{query}"
        raise Unavailable("the upstream's referrers list has too many pages")

    async def referrers_tag(
        self, repository: str, subject: Digest
    ) -> tuple[Descriptor, ...] | None:
        """The descriptors of the referrers tag schema's index (``sha256-<hex>``) for
        ``subject``, or None when there is no such tag. Its digest is checked against
        what the upstream claims."""
        try:
            got = await self.get_manifest(repository, fallback_tag(subject), INDEX_ONLY)
        except ManifestUnknown:
            return None
        if got.digest and got.digest != str(Digest.of(got.data)):
            raise Unavailable(
                "the upstream sent a referrers index that does not match its digest",
                {"tag": fallback_tag(subject)},
            )
        descriptors = index_descriptors(got.data) if got.media_type == OCI_INDEX else None
        if descriptors is None:
            log.warn(
                "{repository}:{tag} is not an OCI image index ({media_type}): no referrers",
                repository=repository,
                tag=fallback_tag(subject),
                media_type=got.media_type,
            )
            return ()
        return descriptors

    # -- helpers ---------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        repository: str,
        headers: Mapping[str, str] | None = None,
        *,
        unbuffered: bool = False,
    ) -> _Response:
        response = await self._upstream.request(
            method, path, repository, headers, unbuffered=unbuffered
        )
        limit = response.headers.getRawHeaders("ratelimit-limit")
        if limit:
            self.ratelimit_limit = limit[0]
        remaining = response.headers.getRawHeaders("ratelimit-remaining")
        if remaining and remaining[0] != self.ratelimit_remaining:
            self.ratelimit_remaining = remaining[0]
            log.info(
                "{upstream} rate limit remaining: {remaining}",
                upstream=self.name,
                remaining=remaining[0],
            )
        return response

    async def _read(self, response: _Response) -> bytes:
        return await read_limited(response, self.max_body, self._clock, self.read_timeout)


def _next_page(link: str | None, path: str) -> str | None:
    """The query of the next referrers page an upstream's ``Link`` names: only when it
    points at the same referrers path (never another host or path); None when there is
    no next page."""
    if not link or "<" not in link or 'rel="next"' not in link:
        return None
    target = urlsplit(link.split("<", 1)[1].split(">", 1)[0])
    if target.path not in ("", path) or not target.query:
        return None
    return target.query


def _header(response: _Response, name: str) -> str:
    value: str = response.headers.getRawHeaders(name, [""])[0]
    return value


def error_for(response: _Response, what: What, upstream: str) -> RegistryError:
    """The error to give a client for a non-success upstream answer."""
    code = response.code
    detail = {"upstream": upstream, "status": code}
    if code == 404:
        unknown: dict[What, type[RegistryError]] = {
            Kind.BLOB: BlobUnknown,
            Kind.MANIFEST: ManifestUnknown,
        }
        cls = unknown.get(what, NameUnknown)
        return cls(f"{what} unknown to the upstream registry", detail)
    if code == 401:
        return Unauthorized("the upstream registry requires authentication", detail)
    if code == 403:
        return Denied("the upstream registry denied access", detail)
    if code == 429:
        error = TooManyRequests("the upstream registry is rate-limiting the mirror", detail)
        retry = response.headers.getRawHeaders("retry-after")
        if retry:
            error.headers[b"retry-after"] = retry[0].encode("latin-1")
        return error
    return Unavailable(f"the upstream registry answered {code}", detail)
