"""The HTTP server: the site, and its request and channel classes.

``make_site`` builds the ``RegistrySite`` of a listener around the API's resource tree
(``regmirror.api.resource.make_root``), which requests reach by ordinary traversal.
The classes here add what the listener needs and Twisted does not do by itself:

- ``RegistryRequest`` keeps HTTP/1.0 ``Connection: keep-alive`` connections open when
  the response has a Content-Length (Twisted closes every HTTP/1.0 connection) and names
  the server;
- ``RegistryChannel`` answers a TLS handshake on a plain-HTTP port at once, enforces
  the listener's ``Limits`` (``LimitedChannel``), and answers cached manifests itself
  when the API says it would answer them from memory (``regmirror.http.fastpath``);
- ``RegistrySite`` writes the access log as a structured event (or not at all) and
  counts responses by status, for the metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any
from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from regmirror.api.access import AccessRules
from regmirror.api.auth import ClientAuth, authenticated_user
from regmirror.api.resource import HIT, RegistryAPI, make_root
from regmirror.api.responses import API_VERSION
from regmirror.api.senders import Streaming
from regmirror.config import Limits
from regmirror.http.fastpath import FastPath, ManifestResponses, parse_head
from regmirror.http.internals import send_now, zero_copy_socket
from regmirror.http.limits import LimitedChannel
from regmirror.logs import get_logger
from regmirror.mirror.cache import Cache
from regmirror.mirror.mirrors import Mirrors
from twisted import copyright

log = get_logger()

SERVER = f"regmirror (TwistedWeb/{copyright.version})".encode()


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The ``Date`` header, formatted once a second (not once a request)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, datetimeToString(now))
    return _date[1]


class RegistryRequest(Request):
    """A request that keeps HTTP/1.0 keep-alive connections open when the response has
    a Content-Length (see ``RegistryChannel.keep_alive_1_0``), and that reaches its
    resource by the Resource tree's traversal with less work per request than
    ``Request.process``."""

    def process(self) -> None:
        """``Request.process``, leaner on the hot path (a cached manifest is answered in
        ~150 µs, so each µs shows): the ``Date`` header formatted once a second, our
        ``Server`` header (the site's: a worker adds its number) set once, path segments
        unquoted only when they hold a ``%``.
        Traversal is still ``Site.getResourceFor``: the one way into the API. No
        encoding resources (gzip wrappers) are used here, so their check is left out;
        the rare ``*`` target goes to Twisted's own ``process``."""
        if self.path == b"*":
            super().process()
            return
        channel = self.channel
        assert isinstance(channel, RegistryChannel)  # RegistrySite's protocol
        site = channel.site  # getResourceFor sets self.site
        self.setHeader(b"server", site.server if isinstance(site, RegistrySite) else SERVER)
        self.setHeader(b"date", http_date())
        self.prepath = []
        self.postpath = [unquote(s) if b"%" in s else s for s in self.path[1:].split(b"/")]
        try:
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.clientproto == b"HTTP/1.0":
            channel = self.channel
            if isinstance(channel, RegistryChannel) and channel.keep_alive_1_0:
                if self.responseHeaders.hasHeader(b"content-length"):
                    self.responseHeaders.setRawHeaders(b"connection", [b"Keep-Alive"])
                else:
                    channel.persistent = False
        super().write(data)


class RegistryChannel(LimitedChannel):
    """An HTTP channel that answers a TLS handshake on a plain-HTTP port at once, as Go's
    net/http does: clients that try HTTPS first (skopeo, containerd, podman) then fall
    back to HTTP immediately instead of waiting for their handshake timeout (not on a TLS
    listener: ``sniff_tls`` is false there). It also keeps HTTP/1.0 ``Connection:
    keep-alive`` connections (see ``RegistryRequest``), and enforces the listener's
    ``Limits``."""

    site: Site  # set by Site.buildProtocol
    sniff_tls = True
    keep_alive_1_0 = False
    fast: FastPath | None = None  # set by RegistrySite.buildProtocol
    _host: Any = None

    def getHost(self) -> Any:
        # Asked for every request (a getsockname call each time); it never changes.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        if version == b"HTTP/1.0":
            connection = request.requestHeaders.getRawHeaders(b"connection") or [b""]
            self.keep_alive_1_0 = b"keep-alive" in connection[0].lower()
            return self.keep_alive_1_0
        return bool(super().checkPersistence(request, version))

    def dataReceived(self, data: bytes) -> None:
        if self.sniff_tls:
            self.sniff_tls = False
            if data[:1] == b"\x16" and self.transport is not None:
                self.transport.write(
                    b"HTTP/1.0 400 Bad Request\r\n\r\n"
                    b"Client sent an HTTP request to an HTTPS server.\n"
                )
                self.transport.loseConnection()
                return
        if self.fast is not None and self._head_timer is None and not self._refused:
            data = self._answer_cached(self.fast, data)
            if not data:
                return
        super().dataReceived(data)

    def _answer_cached(self, fast: FastPath, data: bytes) -> bytes:
        """Answer the cached manifests asked for at the start of ``data`` (complete
        request heads, one after the other, while the channel is between requests);
        what is left goes to the full path, in order."""
        if not self.between_requests:
            return data
        self.resetTimeout()  # as HTTPChannel.dataReceived does
        while data:
            head = parse_head(data, self.totalHeadersSize, self.maxHeaders)
            if head is None:
                return data
            response = fast.answer(head, self.getPeer)
            if response is None:
                return data
            send_now(self.transport, response)
            if head.close:  # as HTTPChannel does: what follows is dropped
                self.persistent = False
                self.loseConnection()
                return b""
            data = data[head.length :]
            if not self.between_requests or self.transport is None:
                return data  # the transport paused us, or went away
        return b""


class RegistrySite(Site):
    """A ``Site`` whose access log is a structured event (or nothing), whose channels
    enforce ``limits`` (``idle_timeout`` is the Site's timeout)."""

    protocol = RegistryChannel

    def __init__(
        self,
        resource: Resource,
        *,
        access_log: bool = True,
        tls: bool = False,
        limits: Limits | None = None,
        server: bytes = SERVER,
        fast_path: bool = True,
        **kwargs: Any,
    ) -> None:
        limits = limits or Limits()
        kwargs.setdefault("timeout", limits.idle_timeout or None)
        super().__init__(resource, requestFactory=RegistryRequest, **kwargs)
        self.tls = tls
        self.limits = limits
        self.server = server  # the Server header (a worker adds its number)
        self._access_log = access_log
        self.responses: Counter[int] = Counter()  # status -> count, for metrics
        self.noisy = False
        api = resource.getStaticEntity(b"v2")
        self.fast = (
            FastPath(api, ManifestResponses(server, API_VERSION, HIT), http_date, self._log_access)
            if fast_path and isinstance(api, RegistryAPI)
            else None
        )

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if isinstance(channel, RegistryChannel):
            channel.configure(self.limits)
            channel.sniff_tls = not self.tls
            channel.fast = self.fast
        return channel

    def log(self, request: http.Request) -> None:
        self._log_access(
            request.getClientAddress,
            authenticated_user(request),
            request.method,
            request.uri,
            request.code,
            request.sentLength,
        )

    def _log_access(
        self, peer: Any, user: str | None, method: bytes, uri: bytes, code: int, length: int
    ) -> None:
        """Count a response; log it unless the access log is off (``peer()``: the
        client's address, asked only then)."""
        self.responses[code] += 1
        if not self._access_log:
            return
        address = peer()
        log.info(
            '{client} {user} "{method} {uri}" {code} {length}',
            client=address.host if hasattr(address, "host") else "-",
            user=user or "-",
            method=method.decode("latin-1"),
            uri=uri.decode("latin-1")[:500],
            code=code,
            length=length,
        )


def make_site(
    cache: Cache | Mirrors,
    *,
    reactor: IReactorTime,
    access_log: bool = True,
    tls: bool = False,
    auth: ClientAuth | None = None,
    access: AccessRules | None = None,
    limits: Limits | None = None,
    worker: int | None = None,
    fast_path: bool = True,
) -> RegistrySite:
    """The site of a listener: the API behind ``auth`` and ``access``, within
    ``limits``; blobs go out with sendfile where the connection allows it, and a client
    that stops reading one is cut after the idle timeout. A worker of
    ``regmirror.workers`` says which one it is in the ``Server`` header."""
    limits = limits or Limits()
    streaming = Streaming(reactor, limits.idle_timeout, zero_copy_socket)
    root = make_root(cache, auth=auth, access=access, limits=limits, streaming=streaming)
    server = SERVER if worker is None else SERVER + b" worker/%d" % worker
    return RegistrySite(
        root,
        access_log=access_log,
        tls=tls,
        limits=limits,
        server=server,
        fast_path=fast_path,
        reactor=reactor,
    )
