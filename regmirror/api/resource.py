"""The ``/v2/`` registry API: a twisted.web Resource tree, read-only.

``RegistryAPI`` is the one way into the API: the client is authenticated, the request
routed (``router``) and checked against the access rules (``access``) before anything
touches the cache or the disk; then it is dispatched on its route. Manifests by digest
or by a fresh tag are answered inside ``render()`` from memory; everything else runs in
a coroutine whose wait is cancelled if the client goes away. Blobs are sent by the
sender ``make_sender`` picks for their source (``senders``); every error is rendered
once, by ``responses``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import attrs
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.api.access import Access, AccessRules
from regmirror.api.auth import ClientAuth, behind
from regmirror.api.responses import (
    API_VERSION,
    blob_headers,
    finish_json,
    json_body,
    manifest_body,
    render_error,
    render_failure,
)
from regmirror.api.router import Route, RouteKind, query_int, query_media_types, query_str, route
from regmirror.api.senders import NO_LISTENER, Streaming, make_sender
from regmirror.config import Limits
from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError, Unsupported
from regmirror.domain.media import OCI_INDEX, Accept
from regmirror.mirror.cache import Cache
from regmirror.mirror.manifests import Manifest
from regmirror.mirror.mirrors import Mirrors
from regmirror.mirror.sources import CommittedBlob

# Whether a manifest or blob came from the cache (HIT) or the upstream was asked (MISS):
# what ``regmirror prefetch`` counts as cached and fetched.
X_CACHE, HIT, MISS = b"x-cache", b"HIT", b"MISS"
MAX_ROUTES = 10_000  # (method, path) -> Route remembered
MAX_ACCEPTS = 1_000  # Accept headers parsed and remembered


class CachedHit(NamedTuple):
    """A request ``RegistryAPI.render`` would answer from memory: this manifest, to the
    user the client authenticated as (None: anonymous, or no client authentication).
    A NamedTuple: one is built per cached manifest served by the fast path."""

    manifest: Manifest
    user: str | None


class RegistryAPI(Resource):
    """``/v2/`` and everything under it."""

    isLeaf = True

    def __init__(
        self,
        cache: Cache | Mirrors,
        *,
        auth: ClientAuth | None = None,
        access: AccessRules | None = None,
        max_url_length: int = 8 * 1024,
        streaming: Streaming = NO_LISTENER,
    ) -> None:
        super().__init__()
        self._mirrors = cache if isinstance(cache, Mirrors) else Mirrors([cache])
        self._auth = auth
        self._access = (
            Access(access, self._mirrors) if access is not None and access.restricts else None
        )
        self._max_url_length = max_url_length
        self._streaming = streaming
        self._accepts: dict[tuple[bytes, ...], Accept] = {}
        self._routes: dict[tuple[bytes, bytes], Route] = {}

    # -- authentication --------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"docker-distribution-api-version", API_VERSION)
        if len(request.uri) > self._max_url_length:
            error = Unsupported("the request URI is too long", status=414)
            return render_error(request, error)
        return behind(self._auth, request, self._dispatch)

    def cached_manifest(
        self,
        method: bytes,
        uri: bytes,
        path: bytes,
        args: dict[bytes, list[bytes]],
        headers: Mapping[bytes, bytes],
        accept: tuple[bytes, ...],
    ) -> CachedHit | None:
        """What ``render`` would answer from memory for a ``GET`` or ``HEAD`` (``headers``:
        lower-case names, each once; no ``If-None-Match``; ``accept``: the values of
        every ``Accept`` header, in order), checked the same way: the
        client's authentication (only as already known: no bcrypt run starts here), the
        route, ``?ns=``, the access rules, the client's ``Accept`` and the manifest's
        freshness, with the same use recorded and the same hit counted (and
        ``manifest_fast_hits``: the caller answers it). None for anything
        else, before any side effect: ``render`` then answers it as usual. (The channel's
        fast path, ``regmirror.http.fastpath``, asks this.)"""
        if len(uri) > self._max_url_length:
            return None
        user = None
        if self._auth is not None:
            authorization = headers.get(b"authorization")
            user = self._auth.htpasswd.remembered(authorization)
            if user is None and not (self._auth.anonymous_read and not authorization):
                return None
        try:
            sent = self._route(method, path)
            if sent.kind is not RouteKind.MANIFEST:
                return None
            ns = None
            if args:
                values = args.get(b"ns")
                if values:
                    ns = values[0].decode("utf-8", "replace")
                    if ns not in self._mirrors.by_name:
                        return None  # refused, or served by the only upstream: logged there
            r, cache = self._pick_ns(sent, ns)
            if self._access is not None and not self._access.allows(sent.name, r.name, cache):
                return None
            manifest = cache.fresh_manifest(r.name, r.reference, self._accept_of(accept))
        except RegistryError:
            return None
        if manifest is None:
            return None
        cache.stats["manifest_fast_hits"] += 1
        return CachedHit(manifest, user)

    # -- routing ---------------------------------------------------------------------

    def _route(self, method: bytes, path: bytes) -> Route:
        """``route``, remembered for the paths seen most (valid ones only)."""
        key = (method, path)
        r = self._routes.get(key)
        if r is None:
            r = route(method, path)
            if len(self._routes) > MAX_ROUTES:
                self._routes.clear()
            self._routes[key] = r
        return r

    def _pick(self, request: Request, r: Route) -> tuple[Route, Cache]:
        """The upstream a request is for (``?ns=``, a path prefix, or the default)."""
        if not r.name:
            return r, self._mirrors.default
        return self._pick_ns(r, query_str(request, b"ns") if request.args else None)

    def _pick_ns(self, r: Route, ns: str | None) -> tuple[Route, Cache]:
        cache, name = self._mirrors.pick(r.name, ns)
        return (r if name == r.name else attrs.evolve(r, name=name)), cache

    def _dispatch(self, request: Request) -> bytes | int:
        try:
            sent = self._route(request.method, request.path)
            r, cache = self._pick(request, sent)
            if self._access is not None and r.name:
                self._access.check(sent.name, r.name, cache)
            if r.kind is RouteKind.BASE:
                return json_body(request, b"{}")
            if r.kind is RouteKind.MANIFEST:
                manifest = cache.fresh_manifest(r.name, r.reference, self._accept(request))
                if manifest is not None:
                    request.setHeader(X_CACHE, HIT)
                    return manifest_body(request, manifest)
        except RegistryError as e:
            return render_error(request, e)
        d = Deferred.fromCoroutine(self._handle(request, r, cache))
        d.addErrback(render_failure, request)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    def _accept(self, request: Request) -> Accept:
        headers = request.requestHeaders.getRawHeaders(b"accept")
        return self._accept_of(tuple(headers) if headers else ())

    def _accept_of(self, key: tuple[bytes, ...]) -> Accept:
        """The ``Accept`` header values ``key``, parsed (remembered for the ones seen most)."""
        accept = self._accepts.get(key)
        if accept is None:
            accept = Accept.parse([h.decode("latin-1") for h in key])
            if len(self._accepts) > MAX_ACCEPTS:
                self._accepts.clear()
            self._accepts[key] = accept
        return accept

    # -- handlers --------------------------------------------------------------------

    async def _handle(self, request: Request, r: Route, cache: Cache) -> None:
        match r.kind:
            case RouteKind.MANIFEST:
                manifest = await cache.manifest(r.name, r.reference, self._accept(request))
                request.setHeader(X_CACHE, MISS)
                request.write(manifest_body(request, manifest))
                request.finish()
            case RouteKind.BLOB:
                assert isinstance(r.reference, Digest)
                await self._blob(request, cache, r.name, r.reference)
            case RouteKind.TAGS:
                n, last = query_int(request, b"n"), query_str(request, b"last")
                body, link = await cache.tags(r.name, n, last)
                finish_json(request, body, link)
            case RouteKind.REFERRERS:
                assert isinstance(r.reference, Digest)
                types = query_media_types(request, b"artifactType")
                answer = await cache.referrers(r.name, r.reference, types)
                if answer.filtered:
                    request.setHeader(b"oci-filters-applied", b"artifactType")
                request.write(json_body(request, answer.body, OCI_INDEX.encode()))
                request.finish()
            case RouteKind.CATALOG:
                n, last = query_int(request, b"n"), query_str(request, b"last")
                body, link = await self._mirrors.catalog(n, last)
                if self._access is not None:
                    body = self._access.filter_catalog(body)
                finish_json(request, body, link)

    async def _blob(self, request: Request, cache: Cache, name: str, digest: Digest) -> None:
        if request.method == b"HEAD":
            size = await cache.blob_size(name, digest)
            blob_headers(request, digest)
            request.setHeader(b"content-length", b"%d" % size)
            request.finish()
            return
        source = await cache.blob(name, digest)
        hit = isinstance(source, CommittedBlob) and not source.fetched
        request.setHeader(X_CACHE, HIT if hit else MISS)
        sender = make_sender(request, digest, source, self._streaming)
        request.notifyFinish().addBoth(lambda _: cache.count_served(request.sentLength))
        sender.start()


class _NotFound(Resource):
    """Anything outside ``/v2/``: a 404 in the spec's error format."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        error = Unsupported("unknown endpoint: this is a registry mirror (see /v2/)", status=404)
        return render_error(request, error)


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        return _NotFound().render(request)


def make_root(
    cache: Cache | Mirrors,
    *,
    auth: ClientAuth | None = None,
    access: AccessRules | None = None,
    limits: Limits | None = None,
    streaming: Streaming = NO_LISTENER,
) -> Resource:
    """The resource tree: ``/v2/`` (the API), and a 404 in the spec's format elsewhere
    (the listener adds ``/metrics``)."""
    root = _Root()
    max_url = (limits or Limits()).max_url_length
    api = RegistryAPI(cache, auth=auth, access=access, max_url_length=max_url, streaming=streaming)
    root.putChild(b"v2", api)
    return root
