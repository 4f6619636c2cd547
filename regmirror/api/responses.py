"""What the API writes: JSON bodies, manifest and blob headers, and errors.

Every error a client sees goes through ``render_error``: a ``RegistryError`` in the
spec's JSON format, rendered once, here. A handler that fails is answered by
``render_failure`` (its errback): with the error's body while nothing was sent yet, and
by cutting the connection once headers are out, the only honest error left then.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.server import Request

from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError
from regmirror.logs import get_logger
from regmirror.mirror.manifests import Manifest

log = get_logger()

API_VERSION = b"registry/2.0"


def gone(request: Request) -> bool:
    """The response is complete, or the client went away: nothing may be written.
    (Twisted drops a request's channel when its connection is lost; a test in
    tests/unit/test_internals.py holds it to that.)"""
    return bool(request.finished) or request.channel is None


def json_body(request: Request, body: bytes, content_type: bytes = b"application/json") -> bytes:
    """``body`` as the JSON answer (nothing for HEAD), its headers set."""
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


def finish_json(request: Request, body: bytes, link: str | None) -> None:
    """Send a JSON answer (with the next page's ``Link``, if any) and finish."""
    if link is not None:
        request.setHeader(b"link", link.encode())
    request.write(json_body(request, body))
    request.finish()


def render_error(request: Request, error: RegistryError) -> bytes:
    """A registry error in the spec's JSON format: every error response goes through
    here."""
    request.setResponseCode(error.status)
    for key, value in error.headers.items():
        request.setHeader(key, value)
    return json_body(request, error.body())


def render_failure(failure: Failure, request: Request) -> None:
    """The errback of a handler: its error answered, unless the client went away."""
    if failure.check(CancelledError) or gone(request):
        return
    if failure.check(RegistryError):
        error = failure.value
    else:
        log.failure("error while handling {uri}", failure, uri=request.uri)
        error = RegistryError("internal error")
    if request.startedWriting:
        abort(request)
        return
    request.write(render_error(request, error))
    request.finish()


def abort(request: Request) -> None:
    """Cut the connection: after headers were sent, a client must see a broken transfer,
    never a short body that looks complete."""
    transport = getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


def manifest_body(request: Request, manifest: Manifest) -> bytes:
    """A manifest's headers set, and its body (nothing for HEAD or a matching
    ``If-None-Match``: 304)."""
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


def blob_headers(request: Request, digest: Digest) -> None:
    """The headers of every blob answer (``Content-Length`` and a range's are the
    sender's)."""
    d = str(digest).encode()
    request.setHeader(b"content-type", b"application/octet-stream")
    request.setHeader(b"docker-content-digest", d)
    request.setHeader(b"etag", b'"' + d + b'"')
    request.setHeader(b"accept-ranges", b"bytes")
    request.setHeader(b"cache-control", b"max-age=31536000")
