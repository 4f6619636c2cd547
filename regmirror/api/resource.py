"""The ``/v2/`` registry API: a twisted.web Resource tree, read-only.

Routing and validation happen before anything touches the cache or the disk; every
error is a ``RegistryError`` rendered once, here, in the spec's JSON format. Blobs are
streamed by ``BlobSender``, a push producer that reads bounded chunks from a committed
file or follows the temporary file of a fetch in flight.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from regmirror.api.auth import AccessRules, ClientAuth
from regmirror.config import Limits
from regmirror.domain.digest import Digest
from regmirror.domain.errors import (
    Denied,
    PaginationInvalid,
    RegistryError,
    Unsupported,
)
from regmirror.domain.media import Accept
from regmirror.domain.names import parse_reference, validate_name
from regmirror.domain.ranges import Unsatisfiable, parse_range
from regmirror.fetch.blobfetch import BlobFetch
from regmirror.http.limits import LimitedChannel, StallTimer
from regmirror.logs import get_logger
from regmirror.mirror.cache import Cache
from regmirror.mirror.manifests import Manifest
from regmirror.mirror.mirrors import Mirrors
from regmirror.mirror.sources import CommittedBlob, FollowedFetch, PassThrough
from twisted import copyright

log = get_logger()

CHUNK = 256 * 1024
SENDFILE = hasattr(os, "sendfile")
SENDFILE_MAX = 16 * 1024 * 1024
API_VERSION = b"registry/2.0"
SERVER = f"regmirror (TwistedWeb/{copyright.version})".encode()
READ_METHODS = (b"GET", b"HEAD")
_ROUTE = re.compile(
    r"(?P<name>.+)/(?:(?P<kind>manifests|blobs)/(?P<ref>[^/]+)|tags/(?P<tags>list))\Z"
)
_UPLOADS = re.compile(r".+/blobs/uploads(?:/.*)?\Z")


@attrs.frozen
class Route:
    kind: str  # "base", "catalog", "manifest", "blob", "tags"
    name: str = ""
    reference: str | Digest = ""


def route(method: bytes, path: bytes) -> Route:
    """Map a raw request path (not percent-decoded) to what it asks for, validating the
    name, tag and digest it contains. Raises ``RegistryError`` for anything else."""
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        raise Unsupported("unknown endpoint", status=404) from None
    if not text.startswith("/v2/") and text != "/v2":
        raise Unsupported("unknown endpoint", status=404)
    rest = text[4:]
    if rest == "":
        return _read_only(method, Route("base"))
    if rest == "_catalog":
        return _read_only(method, Route("catalog"))
    if _UPLOADS.match(rest):
        raise Unsupported("this registry is a read-only mirror: pushes are not supported")
    match = _ROUTE.match(rest)
    if match is None:
        raise Unsupported("unknown endpoint", status=404)
    name = validate_name(match.group("name"))
    if match.group("tags"):
        return _read_only(method, Route("tags", name))
    kind = "manifest" if match.group("kind") == "manifests" else "blob"
    if method not in READ_METHODS:
        _read_only(method, Route(kind, name))
    reference = parse_reference(match.group("ref"))
    if kind == "blob" and not isinstance(reference, Digest):
        reference = Digest.parse(match.group("ref"))
    return Route(kind, name, reference)


def _read_only(method: bytes, r: Route) -> Route:
    if method not in READ_METHODS:
        error = Unsupported("this registry is a read-only mirror", status=405)
        error.headers[b"allow"] = b"GET, HEAD"
        raise error
    return r


def _query_int(request: Request, key: bytes) -> int | None:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(key)
    if not values:
        return None
    text = values[0].decode("latin-1")
    if not text.isdigit() or len(text) > 9:
        raise PaginationInvalid("invalid number of results requested", {"n": text[:20]})
    return int(text)


def _query_str(request: Request, key: bytes) -> str | None:
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(key)
    return values[0].decode("utf-8", "replace") if values else None


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
    ) -> None:
        super().__init__()
        self._mirrors = cache if isinstance(cache, Mirrors) else Mirrors([cache])
        self._auth = auth
        self._access = access if access is not None and access.restricts else None
        self._max_url_length = max_url_length
        self._accepts: dict[tuple[bytes, ...], Accept] = {}
        self._routes: dict[tuple[bytes, bytes], Route] = {}

    def _route(self, method: bytes, path: bytes) -> Route:
        """``route``, remembered for the paths seen most (valid ones only)."""
        key = (method, path)
        r = self._routes.get(key)
        if r is None:
            r = route(method, path)
            if len(self._routes) > 10000:
                self._routes.clear()
            self._routes[key] = r
        return r

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"docker-distribution-api-version", API_VERSION)
        if len(request.uri) > self._max_url_length:
            error = Unsupported("the request URI is too long", status=414)
            return _render_error(request, error)
        if self._auth is not None:
            user = self._auth.htpasswd.authenticate(request.getHeader(b"authorization"))
            if isinstance(user, Deferred):
                user.addCallback(self._authenticated, request)
                user.addErrback(self._failed, request)
                return NOT_DONE_YET
            if user is None and not self._anonymous_allowed(request):
                return _render_error(request, self._auth.challenge())
            if user is not None:
                request.regmirror_user = user  # type: ignore[attr-defined]
        return self._dispatch(request)

    def _anonymous_allowed(self, request: Request) -> bool:
        assert self._auth is not None
        return (
            self._auth.anonymous_read
            and request.method in READ_METHODS
            and not request.getHeader(b"authorization")
        )

    def _authenticated(self, user: str | None, request: Request) -> None:
        if request.finished or request._disconnected:
            return
        if user is None and not self._anonymous_allowed(request):
            assert self._auth is not None
            body: bytes | int = _render_error(request, self._auth.challenge())
        else:
            if user is not None:
                request.regmirror_user = user  # type: ignore[attr-defined]
            body = self._dispatch(request)
        if body is not NOT_DONE_YET:
            assert isinstance(body, bytes)
            request.write(body)
            request.finish()

    def _check_access(self, sent: str, r: Route, cache: Cache) -> None:
        """``regmirror.access``: patterns match the name as the client sent it, as the
        upstream knows it, and prefixed with the upstream's name (``docker.io/library/
        alpine``), so that one list can hold rules for several upstreams."""
        if self._access is None or not r.name:
            return
        upstream = cache.upstream
        repository = upstream.repository(r.name)
        names = (sent, r.name, repository, f"{upstream.name}/{repository}")
        if not self._access.allows(names):
            raise Denied("access to this repository is denied", {"name": sent})

    def _pick(self, request: Request, r: Route) -> tuple[Route, Cache]:
        """The upstream a request is for (``?ns=``, a path prefix, or the default)."""
        if not r.name:
            return r, self._mirrors.default
        ns = _query_str(request, b"ns") if request.args else None
        cache, name = self._mirrors.pick(r.name, ns)
        return (r if name == r.name else attrs.evolve(r, name=name)), cache

    def _dispatch(self, request: Request) -> bytes | int:
        try:
            sent = self._route(request.method, request.path)
            r, cache = self._pick(request, sent)
            self._check_access(sent.name, r, cache)
            if r.kind == "base":
                return _json(request, b"{}")
            if r.kind == "manifest":
                manifest = self._cached_manifest(request, r, cache)
                if manifest is not None:
                    return self._send_manifest(request, manifest)
        except RegistryError as e:
            return _render_error(request, e)
        d = Deferred.fromCoroutine(self._handle(request, r, cache))
        d.addErrback(self._failed, request)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    # -- handlers --------------------------------------------------------------------

    async def _handle(self, request: Request, r: Route, cache: Cache) -> None:
        if r.kind == "manifest":
            manifest = await cache.manifest(r.name, r.reference, self._accept(request))
            body = self._send_manifest(request, manifest)
            request.write(body)
            request.finish()
        elif r.kind == "blob":
            assert isinstance(r.reference, Digest)
            await self._blob(request, cache, r.name, r.reference)
        elif r.kind == "tags":
            n, last = _query_int(request, b"n"), _query_str(request, b"last")
            body, link = await cache.tags(r.name, n, last)
            self._finish_json(request, body, link)
        elif r.kind == "catalog":
            n, last = _query_int(request, b"n"), _query_str(request, b"last")
            body, link = await self._mirrors.catalog(n, last)
            if self._access is not None:
                body = self._filter_catalog(body)
            self._finish_json(request, body, link)

    def _filter_catalog(self, body: bytes) -> bytes:
        """Repositories the access rules deny are not listed."""
        assert self._access is not None
        doc = json.loads(body)
        names = doc.get("repositories") or []
        upstream = self._mirrors.default.upstream
        doc["repositories"] = [
            n
            for n in names
            if self._access.allows(
                (n, upstream.repository(n), f"{upstream.name}/{upstream.repository(n)}")
            )
        ]
        return json.dumps(doc).encode()

    def _accept(self, request: Request) -> Accept:
        headers = request.requestHeaders.getRawHeaders(b"accept")
        key = tuple(headers) if headers else ()
        accept = self._accepts.get(key)
        if accept is None:
            accept = Accept.parse([h.decode("latin-1") for h in key])
            if len(self._accepts) > 1000:
                self._accepts.clear()
            self._accepts[key] = accept
        return accept

    def _cached_manifest(self, request: Request, r: Route, cache: Cache) -> Manifest | None:
        """The fast path: a manifest by digest, or by a fresh tag, from memory."""
        return cache.fresh_manifest(r.name, r.reference, self._accept(request))

    def _send_manifest(self, request: Request, manifest: Manifest) -> bytes:
        digest = str(manifest.digest).encode()
        request.setHeader(b"content-type", manifest.media_type.encode())
        request.setHeader(b"docker-content-digest", digest)
        request.setHeader(b"etag", b'"' + digest + b'"')
        request.setHeader(b"content-length", b"%d" % len(manifest.data))
        if_none_match = request.getHeader(b"if-none-match")
        if if_none_match is not None and digest in if_none_match:
            request.setResponseCode(304)
            return b""
        if request.method == b"HEAD":
            return b""
        return manifest.data

    async def _blob(self, request: Request, cache: Cache, name: str, digest: Digest) -> None:
        if request.method == b"HEAD":
            size = await cache.blob_size(name, digest)
            self._blob_headers(request, digest, size)
            request.setHeader(b"content-length", b"%d" % size)
            request.finish()
            return
        fetch: BlobFetch | None = None
        match await cache.blob(name, digest):
            case PassThrough(response=response, size=size):
                self._blob_headers(request, digest, size)
                request.setHeader(b"content-length", b"%d" % size)
                response.deliverBody(_PassThroughBody(request, digest, size))
                return
            case CommittedBlob(fd=fd, size=size, release=release):
                pass
            case FollowedFetch(fetch=fetch, fd=fd, size=size, release=release):
                pass
        try:
            self._blob_headers(request, digest, size)
            first, last = 0, size - 1
            header = request.getHeader(b"range")
            try:
                wanted = parse_range(header.decode("latin-1") if header else None, size)
            except Unsatisfiable as e:
                e.headers[b"content-range"] = b"bytes */%d" % size
                raise
            if wanted is not None:
                first, last = wanted
                request.setResponseCode(206)
                request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
            request.setHeader(b"content-length", b"%d" % (last - first + 1))
        except BaseException:
            os.close(fd)
            release()
            raise
        BlobSender(request, fd, first, last + 1, fetch, release).start()

    def _blob_headers(self, request: Request, digest: Digest, size: int) -> None:
        d = str(digest).encode()
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"docker-content-digest", d)
        request.setHeader(b"etag", b'"' + d + b'"')
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"cache-control", b"max-age=31536000")

    # -- responses -------------------------------------------------------------------

    def _finish_json(self, request: Request, body: bytes, link: str | None) -> None:
        if link is not None:
            request.setHeader(b"link", link.encode())
        request.write(_json(request, body))
        request.finish()

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError) or request.finished or request._disconnected:
            return
        if failure.check(RegistryError):
            error = failure.value
        else:
            log.failure("error while handling {uri}", failure, uri=request.uri)
            error = RegistryError("internal error")
        if request.startedWriting:
            _abort(request)
            return
        request.write(_render_error(request, error))
        request.finish()


def _json(request: Request, body: bytes) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


def _render_error(request: Request, error: RegistryError) -> bytes:
    """A registry error in the spec's JSON format: every error response goes through
    here."""
    request.setResponseCode(error.status)
    for key, value in error.headers.items():
        request.setHeader(key, value)
    return _json(request, error.body())


def _abort(request: Request) -> None:
    transport = getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


@implementer(IPushProducer)
class BlobSender:
    """Streams ``[offset, end)`` of a blob to a request.

    A push producer: it reads bounded chunks from a file descriptor and writes until
    the transport pauses it. Following a fetch in flight, it sends the bytes the
    fetch receives straight from memory while it keeps up (``fetch_data``), reads from
    the temporary file when it has fallen behind, never sends past what the fetch says
    is sendable (the last byte waits for the digest), and aborts the connection if the
    fetch fails.
    """

    def __init__(
        self,
        request: Request,
        fd: int,
        offset: int,
        end: int,
        fetch: BlobFetch | None,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self._release = release
        self._request = request
        self._fd: int | None = fd
        self._offset = offset
        self._end = end
        self._fetch = fetch
        self._paused = False
        self._pumping = False
        self._done = False
        self._tcp: tcp.Connection | None = None

    def start(self) -> None:
        site = getattr(self._request.channel, "site", None)
        self._stall = StallTimer(
            getattr(site, "reactor", None), getattr(site, "stall_timeout", 0.0), self._abort
        )
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(self._finished)
        if self._fetch is not None:
            self._fetch.follow(self)
        elif SENDFILE:
            self._tcp = _plain_tcp(self._request)
            if self._tcp is not None:
                self._request.write(b"")  # the headers
        self._pump()

    # -- IPushProducer ---------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._stall.paused()

    def resumeProducing(self) -> None:
        self._paused = False
        self._stall.resumed()
        self._pump()

    def stopProducing(self) -> None:
        self._close()

    def _finished(self, result: Any) -> None:
        self._close()

    # -- Follower --------------------------------------------------------------------

    def fetch_data(self, offset: int, data: bytes) -> None:
        if self._paused or self._pumping or self._done or offset != self._offset:
            return  # behind (or paused): the file catches this reader up later
        fetch = self._fetch
        assert fetch is not None
        n = min(len(data), min(self._end, fetch.sendable()) - offset)
        if n <= 0:
            return
        self._offset += n
        self._request.write(data if n == len(data) else data[:n])

    def fetch_changed(self) -> None:
        if not self._paused:
            self._pump()

    # -- sending ---------------------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping or self._done:
            return
        if self._tcp is not None:
            self._sendfile()
            return
        self._pumping = True
        try:
            fetch = self._fetch
            while not self._paused and not self._done:
                if fetch is not None and fetch.failed:
                    self._abort()
                    return
                if self._offset >= self._end:
                    self._complete()
                    return
                limit = self._end if fetch is None else min(self._end, fetch.readable())
                if self._offset >= limit:
                    return  # fetch_data or fetch_changed wakes us
                assert self._fd is not None
                data = os.pread(self._fd, min(CHUNK, limit - self._offset), self._offset)
                if not data:
                    log.error("blob file shorter than expected; aborting the transfer")
                    self._abort()
                    return
                self._offset += len(data)
                self._request.write(data)
        except OSError:
            log.failure("cannot read blob")
            self._abort()
        finally:
            self._pumping = False

    def _sendfile(self) -> None:
        """Zero-copy from the page cache to a plain TCP socket. Twisted's buffer must be
        empty first (the headers); when the socket is full, ask the transport to tell
        us (through the HTTP channel's resumeProducing) once it is writable again."""
        transport = self._tcp
        assert transport is not None and self._fd is not None
        while not self._done:
            if self._offset >= self._end:
                self._complete()
                return
            if transport._tempDataLen or len(transport.dataBuffer) > transport.offset:
                self._when_writable(transport)
                return
            try:
                sent = os.sendfile(
                    transport.fileno(),
                    self._fd,
                    self._offset,
                    min(SENDFILE_MAX, self._end - self._offset),
                )
            except BlockingIOError:
                sent = 0
            except OSError:
                self._abort()
                return
            if sent == 0:
                if self._offset < self._end and os.fstat(self._fd).st_size <= self._offset:
                    log.error("blob file shorter than expected; aborting the transfer")
                    self._abort()
                    return
                self._when_writable(transport)
                return
            self._offset += sent
            self._request.sentLength += sent

    def _when_writable(self, transport: tcp.Connection) -> None:
        self._stall.paused()
        transport.producerPaused = True
        transport.startWriting()

    def _complete(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self) -> None:
        self._close()
        self._request.unregisterProducer()
        _abort(self._request)

    def _close(self) -> None:
        self._done = True
        self._stall.stop()
        if self._fetch is not None:
            self._fetch.unfollow(self)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._release()


class _PassThroughBody(Protocol):
    """Streams an upstream blob that is not cached to one client, with the upstream
    connection as the request's producer (a slow client slows only its own download).
    The digest is checked as the bytes go by and the last byte is held back until it
    matched: a wrong body is cut, never completed."""

    def __init__(self, request: Request, digest: Digest, size: int) -> None:
        self._request = request
        self._digest = digest
        self._size = size
        self._hasher = digest.hasher()
        self._received = 0
        self._held = b""

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
        self._request.notifyFinish().addErrback(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._request.finished or self._request._disconnected:
            return
        self._hasher.update(data)
        self._received += len(data)
        if self._held:
            self._request.write(self._held)
        self._request.write(data[:-1])
        self._held = data[-1:]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        request = self._request
        if request.finished or request._disconnected:
            return
        request.unregisterProducer()
        ok = (
            reason.check(ResponseDone) is not None
            and self._received == self._size
            and self._hasher.hexdigest() == self._digest.hex
        )
        if not ok:
            log.error(
                "blob {digest} passed through broke or did not match its digest; cut",
                digest=str(self._digest),
            )
            _abort(request)
            return
        if self._held:
            request.write(self._held)
        request.finish()


def _plain_tcp(request: Request) -> tcp.Connection | None:
    """The request's TCP connection, if nothing (TLS) stands between it and the socket."""
    transport = getattr(request.channel, "transport", None)
    if isinstance(transport, tcp.Connection) and not ISSLTransport.providedBy(transport):
        return transport
    return None


_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, datetimeToString(now))
    return _date[1]


class _Request(Request):
    """A request that goes straight to the ``/v2/`` resource (no traversal), and keeps
    HTTP/1.0 keep-alive connections open when the response has a Content-Length
    (Twisted closes every HTTP/1.0 connection)."""

    def process(self) -> None:
        site = getattr(self.channel, "site", None)
        api = getattr(site, "api", None)
        if api is None or not (self.path.startswith(b"/v2/") or self.path == b"/v2"):
            super().process()
            return
        self.site = site
        self.setHeader(b"server", SERVER)
        self.setHeader(b"date", _http_date())
        self.prepath = [b"v2"]
        self.postpath = []
        try:
            self.render(api)
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.clientproto == b"HTTP/1.0" and self.channel:
            channel = self.channel
            if getattr(channel, "_keep_alive_1_0", False):
                if self.responseHeaders.hasHeader(b"content-length"):
                    self.responseHeaders.setRawHeaders(b"connection", [b"Keep-Alive"])
                else:
                    channel.persistent = False
        super().write(data)


class _Channel(LimitedChannel):
    """An HTTP channel that answers a TLS handshake on a plain-HTTP port at once, as Go's
    net/http does: clients that try HTTPS first (skopeo, containerd, podman) then fall
    back to HTTP immediately instead of waiting for their handshake timeout (not on a TLS
    listener: ``_first`` is false there). It also keeps HTTP/1.0 ``Connection:
    keep-alive`` connections (see ``_Request``), and enforces the listener's ``Limits``."""

    _first = True
    _keep_alive_1_0 = False
    _host: Any = None

    def getHost(self) -> Any:
        # Asked for every request (a getsockname call each time); it never changes.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        if version == b"HTTP/1.0":
            connection = request.requestHeaders.getRawHeaders(b"connection") or [b""]
            self._keep_alive_1_0 = b"keep-alive" in connection[0].lower()
            return self._keep_alive_1_0
        return bool(super().checkPersistence(request, version))

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[:1] == b"\x16" and self.transport is not None:
                self.transport.write(
                    b"HTTP/1.0 400 Bad Request\r\n\r\n"
                    b"Client sent an HTTP request to an HTTPS server.\n"
                )
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class RegistrySite(Site):
    """A ``Site`` whose access log is a structured event (or nothing), whose channels
    enforce ``limits`` (``idle_timeout`` is the Site's timeout)."""

    protocol = _Channel

    def __init__(
        self,
        resource: Resource,
        *,
        access_log: bool = True,
        tls: bool = False,
        limits: Limits | None = None,
        **kwargs: Any,
    ) -> None:
        limits = limits or Limits()
        kwargs.setdefault("timeout", limits.idle_timeout or None)
        super().__init__(resource, requestFactory=_Request, **kwargs)
        self.api: Resource | None = None
        self.tls = tls
        self.limits = limits
        self.stall_timeout = limits.idle_timeout
        self._access_log = access_log
        self.responses: Counter[int] = Counter()  # status -> count, for metrics
        self.noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if isinstance(channel, _Channel):
            channel.configure(self.limits)
            channel._first = not self.tls
        return channel

    def log(self, request: Request) -> None:  # type: ignore[override]
        self.responses[request.code] += 1
        if not self._access_log:
            return
        log.info(
            '{client} {user} "{method} {uri}" {code} {length}',
            client=request.getClientAddress().host
            if hasattr(request.getClientAddress(), "host")
            else "-",
            user=getattr(request, "regmirror_user", None) or "-",
            method=request.method.decode("latin-1"),
            uri=request.uri.decode("latin-1")[:500],
            code=request.code,
            length=request.sentLength,
        )


class _NotFound(Resource):
    """Anything outside ``/v2/``: a 404 in the spec's error format."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        error = Unsupported("unknown endpoint: this is a registry mirror (see /v2/)", status=404)
        return _render_error(request, error)


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
) -> Resource:
    root = _Root()
    max_url = (limits or Limits()).max_url_length
    root.putChild(b"v2", RegistryAPI(cache, auth=auth, access=access, max_url_length=max_url))
    return root


def make_site(
    cache: Cache | Mirrors,
    *,
    access_log: bool = True,
    tls: bool = False,
    auth: ClientAuth | None = None,
    access: AccessRules | None = None,
    limits: Limits | None = None,
    reactor: Any = None,
) -> RegistrySite:
    root = make_root(cache, auth=auth, access=access, limits=limits)
    site = RegistrySite(root, access_log=access_log, tls=tls, limits=limits, reactor=reactor)
    site.api = root.children[b"v2"]
    return site
