"""Blob bodies, sent by mode behind one factory (as ``twisted.web.static``'s
``File.makeProducer`` does).

``make_sender`` sets a blob answer's headers, handles its single ``Range``, and picks
the sender for where the bytes come from (a ``BlobSource``):

- ``SendfileSender``: a committed file to a plain TCP socket, zero-copy (``os.sendfile``);
- ``PreadSender``: a committed file read in bounded chunks (TLS, or no plain socket);
- ``FollowingSendfileSender`` / ``FollowingSender``: a fetch in flight, sent from its
  growing temporary file as the writer puts bytes on disk (zero-copy to a plain TCP
  socket, ``pread`` otherwise), never past what the fetch says is sendable (the last
  byte waits for the digest);
- ``PassThroughSender``: an upstream body too large to cache, to one client, verified
  as it goes by.

The file senders are push producers: they write until the transport pauses them.
``request.write`` may pause (or resume) a sender from inside the write, so a sender's
loop is guarded against re-entry (``_pumping``) and re-checks its state after every
write. A sender whose client takes nothing for the listener's idle timeout is cut
(``StallTimer``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as BodyProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from regmirror.api.responses import abort, blob_headers, gone
from regmirror.api.stall import StallTimer
from regmirror.domain.digest import Digest
from regmirror.domain.ranges import Unsatisfiable, parse_range
from regmirror.fetch.blobfetch import FetchView
from regmirror.logs import get_logger
from regmirror.mirror.sources import BlobSource, CommittedBlob, FollowedFetch, PassThrough

log = get_logger()

CHUNK = 256 * 1024
SENDFILE = hasattr(os, "sendfile")
SENDFILE_MAX = 16 * 1024 * 1024


class ZeroCopySocket(Protocol):
    """A plain TCP connection ``os.sendfile`` may write to, behind Twisted's transport
    (``regmirror.http.internals`` has the implementation: it reaches into Twisted)."""

    def fileno(self) -> int: ...

    def holds_data(self) -> bool:
        """Twisted still has bytes to send before ours (the headers)."""
        ...

    def when_writable(self) -> None:
        """Have the transport resume its producer once the socket is writable again."""
        ...


def no_zero_copy(request: Request) -> ZeroCopySocket | None:
    return None


@attrs.frozen
class Streaming:
    """What the senders take from the listener: the clock and idle timeout that cut a
    stalled client, and how to find a request's plain TCP socket (none: no sendfile)."""

    clock: IReactorTime | None = None
    stall_timeout: float = 0.0
    zero_copy: Callable[[Request], ZeroCopySocket | None] = no_zero_copy


NO_LISTENER = Streaming()  # a tree outside a listener (tests): no stall cut, no sendfile


class Sender(Protocol):
    def start(self) -> None: ...


def make_sender(
    request: Request, digest: Digest, source: BlobSource, streaming: Streaming
) -> Sender:
    """The sender of a blob answer, headers set (``Range`` handled: 206, or 416 raised
    as ``Unsatisfiable``); ``start()`` it. A file's descriptor is the sender's from here
    (closed, and its reader released, if this raises)."""
    match source:
        case PassThrough(response=response, size=size):
            blob_headers(request, digest)
            request.setHeader(b"content-length", b"%d" % size)
            return PassThroughSender(request, response, digest, size)
        case CommittedBlob(fd=fd, size=size, release=release):
            fetch: FetchView | None = None
        case FollowedFetch(fetch=fetch, fd=fd, size=size, release=release):
            pass
    try:
        wanted = _wanted(request, digest, size)
    except BaseException:
        os.close(fd)
        release()
        raise
    span = FileSpan(fd, wanted.start, wanted.stop, release)
    socket = streaming.zero_copy(request) if SENDFILE else None
    if fetch is not None:
        if socket is not None:
            return FollowingSendfileSender(request, span, streaming, socket, fetch)
        return FollowingSender(request, span, streaming, fetch)
    if socket is not None:
        return SendfileSender(request, span, streaming, socket)
    return PreadSender(request, span, streaming)


def _wanted(request: Request, digest: Digest, size: int) -> range:
    """The bytes of the blob to send (all, or the ``Range`` asked for), headers set."""
    blob_headers(request, digest)
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
    return range(first, last + 1)


@attrs.frozen
class FileSpan:
    """Bytes ``[first, end)`` of an open blob file; ``release`` once it is closed."""

    fd: int
    first: int
    end: int
    release: Callable[[], None]


@implementer(IPushProducer)
class _FileSender:
    """Streams a span of an open file to a request, as a push producer; the descriptor
    is closed (and the span released) when done, however it ends."""

    def __init__(self, request: Request, span: FileSpan, streaming: Streaming) -> None:
        self._release = span.release
        self._request = request
        self._fd: int | None = span.fd
        self._offset = span.first
        self._end = span.end
        self._paused = False
        self._pumping = False
        self._done = False
        self._stall = StallTimer(streaming.clock, streaming.stall_timeout, self._abort)

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(self._finished)
        self._begin()
        self._pump()

    def _begin(self) -> None:
        """What a mode does once registered, before the first pump."""

    def _pump(self) -> None:
        raise NotImplementedError

    def _waiting_for_client(self) -> bool:
        """The client's side is full: its transport resumes this sender."""
        raise NotImplementedError

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

    # -- ending ----------------------------------------------------------------------

    def _complete(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self) -> None:
        self._close()
        self._request.unregisterProducer()
        abort(self._request)

    def _close(self) -> None:
        self._done = True
        self._stall.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._release()


class PreadSender(_FileSender):
    """A committed file, read ``CHUNK`` bytes at a time (``os.pread``)."""

    def _limit(self) -> int:
        """Where reading stops for now."""
        return self._end

    def _failed(self) -> bool:
        return False

    def _waiting_for_client(self) -> bool:
        return self._paused

    def _pump(self) -> None:
        if self._pumping or self._done:
            return
        self._pumping = True
        try:
            while not self._paused and not self._done:
                if self._failed():
                    self._abort()
                    return
                if self._offset >= self._end:
                    self._complete()
                    return
                limit = self._limit()
                if self._offset >= limit:
                    return  # fetch_changed wakes us
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


class SendfileSender(_FileSender):
    """A committed file, zero-copy from the page cache to a plain TCP socket."""

    def __init__(
        self, request: Request, span: FileSpan, streaming: Streaming, socket: ZeroCopySocket
    ) -> None:
        super().__init__(request, span, streaming)
        self._socket = socket
        self._blocked = False  # the socket is full: the transport resumes us

    def _begin(self) -> None:
        self._request.write(b"")  # the headers

    def _limit(self) -> int:
        """Where sending stops for now."""
        return self._end

    def _failed(self) -> bool:
        return False

    def _waiting_for_client(self) -> bool:
        return self._blocked

    def resumeProducing(self) -> None:
        self._blocked = False
        super().resumeProducing()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            self._send()
        finally:
            self._pumping = False

    def _send(self) -> None:
        """Twisted's buffer must be empty first (the headers); when the socket is full,
        ask the transport to tell us (through the HTTP channel's resumeProducing) once
        it is writable again."""
        socket = self._socket
        while not self._done:
            if self._failed():
                self._abort()
                return
            if self._offset >= self._end:
                self._complete()
                return
            limit = self._limit()
            if self._offset >= limit:
                return  # fetch_changed wakes us
            if socket.holds_data():
                self._when_writable()
                return
            assert self._fd is not None
            try:
                sent = os.sendfile(
                    socket.fileno(),
                    self._fd,
                    self._offset,
                    min(SENDFILE_MAX, limit - self._offset),
                )
            except BlockingIOError:
                sent = 0
            except OSError:
                self._abort()
                return
            if sent == 0:
                if os.fstat(self._fd).st_size <= self._offset:
                    log.error("blob file shorter than expected; aborting the transfer")
                    self._abort()
                    return
                self._when_writable()
                return
            self._offset += sent
            self._request.sentLength += sent

    def _when_writable(self) -> None:
        self._blocked = True
        self._stall.paused()
        self._socket.when_writable()


class _FollowsFetch(_FileSender):
    """What a sender of a fetch in flight adds to its file mode (a ``Follower``): it
    reads only what the fetch says is on disk and sendable (never the last byte before
    the digest matched), is woken as that grows, and aborts the connection if the
    fetch fails."""

    _fetch: FetchView

    def _begin(self) -> None:
        self._fetch.follow(self)
        super()._begin()

    def _limit(self) -> int:
        """The span's last byte waits for the digest, as the blob's last byte does: a
        ``Range`` answer that ends before the blob must not look complete with bytes
        that may still turn out wrong."""
        limit = min(self._end, self._fetch.readable())
        if limit >= self._end and not self._fetch.verified:
            return self._end - 1
        return limit

    def _failed(self) -> bool:
        return self._fetch.failed

    def fetch_changed(self) -> None:
        if self._failed() and not self._done:
            self._abort()  # at once, even if the client's side is full
        elif not self._waiting_for_client():
            self._pump()

    def _close(self) -> None:
        self._done = True
        self._fetch.unfollow(self)
        super()._close()


class FollowingSender(_FollowsFetch, PreadSender):
    """A fetch in flight, ``pread`` from its temporary file (TLS, or no plain socket)."""

    def __init__(
        self, request: Request, span: FileSpan, streaming: Streaming, fetch: FetchView
    ) -> None:
        super().__init__(request, span, streaming)
        self._fetch = fetch


class FollowingSendfileSender(_FollowsFetch, SendfileSender):
    """A fetch in flight, zero-copy from its temporary file to a plain TCP socket."""

    def __init__(
        self,
        request: Request,
        span: FileSpan,
        streaming: Streaming,
        socket: ZeroCopySocket,
        fetch: FetchView,
    ) -> None:
        super().__init__(request, span, streaming, socket)
        self._fetch = fetch


class PassThroughSender(BodyProtocol):
    """Streams an upstream blob that is not cached to one client, with the upstream
    connection as the request's producer (a slow client slows only its own download).
    The digest is checked as the bytes go by and the last byte is held back until it
    matched: a wrong body is cut, never completed."""

    def __init__(self, request: Request, response: IResponse, digest: Digest, size: int) -> None:
        self._request = request
        self._response = response
        self._digest = digest
        self._size = size
        self._hasher = digest.hasher()
        self._received = 0
        self._held = b""

    def start(self) -> None:
        self._response.deliverBody(self)

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
        self._request.notifyFinish().addErrback(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if gone(self._request):
            return
        self._hasher.update(data)
        self._received += len(data)
        if self._held:
            self._request.write(self._held)
        self._request.write(data[:-1])
        self._held = data[-1:]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        request = self._request
        if gone(request):
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
            abort(request)
            return
        if self._held:
            request.write(self._held)
        request.finish()
