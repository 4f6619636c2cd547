"""Cached manifests answered from the channel, below twisted.web's per-request machinery.

A cached manifest (by digest, or by a fresh tag) is most of what a mirror serves once
warm, and its answer is a few hundred bytes from memory: at ~150 µs a request, Twisted's
request parsing, ``Request`` object, header bookkeeping and write scheduling were most
of the cost. ``RegistryChannel`` hands every complete request head that arrives while it
is between requests to ``FastPath.answer`` first:

- ``parse_head`` reads a ``GET`` or ``HEAD`` of ``/v2/...`` in one pass, and gives up
  (``None``) on anything it does not fully understand or that Twisted treats specially:
  a body, ``Expect``, a folded header, a repeated one (but ``Accept``), ``If-None-Match``,
  no keep-alive on HTTP/1.0, a head larger than the listener's limits;
- ``RegistryAPI.cached_manifest`` (the /v2/ resource itself) says whether it would
  answer the request from memory, with the same authentication, routing, ``?ns=``,
  access rules, ``Accept`` and freshness as its ``render`` (and the same ``Usage`` call
  and hit counter); anything else (a miss, an error, a bcrypt check to run) is ``None``;
- the response is the bytes ``render`` would have sent, headers serialised once per
  manifest (``ManifestResponses``), the ``Date`` of the current second patched in, and
  written with one ``send``; the access log and the response counter are the site's.

Whatever is not answered here (and everything after it in the same read) goes through
the ordinary channel, request and Resource traversal, so pipelined requests keep their
order. ``regmirror.fast_path: false`` turns it off.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.web.http import parse_qs

from regmirror.api.resource import RegistryAPI
from regmirror.domain.digest import Digest
from regmirror.mirror.manifests import Manifest

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"/v2/[!-~]*\Z")  # printable ASCII, no space
# Request headers whose meaning Twisted (or the full path) handles itself.
_NOT_HERE = frozenset(
    (b"content-length", b"transfer-encoding", b"expect", b"if-none-match", b"upgrade")
)
MAX_SERIALISED = 10_000  # manifests whose response headers are kept


class Head(NamedTuple):
    """A complete request head of a ``GET`` or ``HEAD`` under ``/v2/`` (a NamedTuple:
    built for every request, where an attrs class costs several times more)."""

    method: bytes
    uri: bytes  # the request target as sent
    path: bytes  # before ``?``
    args: dict[bytes, list[bytes]]
    version: bytes
    headers: dict[bytes, bytes]  # lower-case name -> value, each name once (not Accept)
    accept: tuple[bytes, ...]  # every Accept header's value, in order (Go sends several)
    close: bool  # HTTP/1.1 ``Connection: close`` (skopeo sends it): closed once answered
    length: int  # bytes of the head, its final empty line included


def parse_head(data: bytes, max_head: int, max_headers: int) -> Head | None:
    """The request head at the start of ``data``, if it is complete and one the fast
    path may answer; None for anything else (the full path decides)."""
    end = data.find(b"\r\n\r\n", 0, max_head)
    if end < 0:
        return None
    block = data[:end]
    lines = block.split(b"\r\n")
    crlfs = len(lines) - 1
    if crlfs > max_headers:
        return None
    # No NUL, no CR or LF but the line ends. (``find`` and ``count``, not ``in``: a
    # bytes ``in`` bytes first fails as an integer, and that error costs more than the
    # search.)
    if block.find(b"\x00") >= 0 or block.count(b"\r") != crlfs or block.count(b"\n") != crlfs:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, uri, version = parts
    if method not in (b"GET", b"HEAD") or version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    if _TARGET.match(uri) is None:
        return None
    headers: dict[bytes, bytes] = {}
    accept: list[bytes] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.match(name) is None:
            return None
        name = name.lower()
        if name == b"accept":
            accept.append(value.strip(b" \t"))
            continue
        if name in headers or name in _NOT_HERE:
            return None
        headers[name] = value.strip(b" \t")
    connection = headers.get(b"connection")
    close = False
    if version == b"HTTP/1.1":
        # as HTTPChannel.checkPersistence reads it
        close = connection is not None and b"close" in connection.lower().split(b" ")
    elif connection is None or connection.lower().find(b"keep-alive") < 0:
        return None  # Twisted closes the connection after this answer
    path, sep, query = uri.partition(b"?")
    args = parse_qs(query, 1) if sep else {}
    return Head(method, uri, path, args, version, headers, tuple(accept), close, end + 4)


class ManifestResponses:
    """Complete responses for cached manifests: status line and headers serialised once
    per manifest, method and HTTP version, as ``RegistryRequest`` would write them."""

    def __init__(self, server: bytes, api_version: bytes, x_cache: bytes) -> None:
        self._server = server
        self._api_version = api_version
        self._x_cache = x_cache
        # Keyed by what the headers say, not by the manifest: an entry must not keep a
        # manifest the LRU has dropped (and its body) alive.
        self._serialised: dict[tuple[Digest, str, int, bytes], bytes] = {}

    def response(
        self, manifest: Manifest, head: bool, version: bytes, date: bytes, close: bool = False
    ) -> bytes:
        key = (manifest.digest, manifest.media_type, len(manifest.data), version)
        rest = self._serialised.get(key)
        if rest is None:
            rest = self._serialise(manifest, version)
            if len(self._serialised) >= MAX_SERIALISED:
                self._serialised.clear()
            self._serialised[key] = rest
        # Twisted sets Connection: close first, when it reads the request head.
        connection = b"Connection: close\r\n" if close else b""
        start = b"%s 200 OK\r\n%sServer: %s\r\nDate: " % (version, connection, self._server)
        return b"".join((start, date, rest, b"" if head else manifest.data))

    def _serialise(self, manifest: Manifest, version: bytes) -> bytes:
        digest = str(manifest.digest).encode()
        keep_alive = b"Connection: Keep-Alive\r\n" if version == b"HTTP/1.0" else b""
        return (
            b"\r\nDocker-Distribution-Api-Version: %s\r\nX-Cache: %s\r\n"
            b"Content-Type: %s\r\nDocker-Content-Digest: %s\r\n"
            b'ETag: "%s"\r\nContent-Length: %d\r\n%s\r\n'
        ) % (
            self._api_version,
            self._x_cache,
            b" ".join(manifest.media_type.encode().splitlines()),  # as twisted.web's Headers
            digest,
            digest,
            len(manifest.data),
            keep_alive,
        )


AccessLog = Callable[[Any, "str | None", bytes, bytes, int, int], None]


class FastPath:
    """Cached manifests answered from a request head (see the module's docstring)."""

    def __init__(
        self,
        api: RegistryAPI,
        responses: ManifestResponses,
        date: Callable[[], bytes],
        log: AccessLog,
    ) -> None:
        self._api = api
        self._responses = responses
        self._date = date
        self._log = log

    def answer(self, head: Head, peer: Callable[[], Any]) -> bytes | None:
        """The complete response to ``head`` (logged), or None: the full path answers."""
        hit = self._api.cached_manifest(
            head.method, head.uri, head.path, head.args, head.headers, head.accept
        )
        if hit is None:
            return None
        is_head = head.method == b"HEAD"
        response = self._responses.response(
            hit.manifest, is_head, head.version, self._date(), head.close
        )
        length = 0 if is_head else len(hit.manifest.data)
        self._log(peer, hit.user, head.method, head.uri, 200, length)
        return response
