"""What one client connection may ask of the listener (``regmirror.*`` limits).

``LimitedChannel`` is an ``HTTPChannel`` that

- answers a request line longer than the URL limit with ``414``, a header line or a
  request head larger than ``max_header_size`` with ``431``, more than ``max_headers``
  headers or a malformed head with ``400``: each with the registry's JSON error body
  and ``Connection: close`` (Twisted sends a bare 400, or just closes the connection);
- gives a client ``header_timeout`` seconds from the first byte of a request to the
  end of its head (slowloris: a client that trickles header bytes keeps resetting the
  idle timeout, not this one); ``408`` and close when it runs out.

The idle timeout (``Site(timeout=...)``) closes connections that send nothing between
requests. While a response is being sent Twisted suspends that timeout; a blob sender
that waits for a client which stopped reading uses ``regmirror.api.stall.StallTimer``
instead.

The channel's request-head state is Twisted's private business: it is read through
``regmirror.http.internals.ChannelInternals``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from regmirror.config import Limits
from regmirror.domain.errors import RegistryError
from regmirror.http.internals import ChannelInternals
from regmirror.logs import get_logger

log = get_logger()


def raw_error(status: int, reason: bytes, message: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    error = RegistryError(message, status=status)
    error.code = "UNSUPPORTED"
    body = error.body()
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Docker-Distribution-Api-Version: registry/2.0\r\n"
        b"Connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


class LimitedChannel(ChannelInternals):
    """An HTTP channel that enforces ``Limits`` (set by the site in ``configure``)."""

    limits = Limits()
    _head_timer: IDelayedCall | None = None
    _refused = False

    def configure(self, limits: Limits) -> None:
        self.limits = limits
        # LineReceiver's line limit applies to the request line and to each header line;
        # HTTPChannel's totalHeadersSize to all of them together.
        self.MAX_LENGTH = max(limits.max_header_size, limits.max_url_length + 32)
        self.totalHeadersSize = limits.max_header_size
        self.maxHeaders = limits.max_headers

    # -- limits on the request head ---------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if (
            self._head_timer is None
            and self.limits.header_timeout
            and not self.handling_request
            and data
        ):
            self._head_timer = self.callLater(self.limits.header_timeout, self._head_too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not self.in_request_head and len(line) > self.limits.max_url_length + 32:
            self._refuse(414, b"Request-URI Too Long", "the request URI is too long")
            return
        if self.received_header_size + len(line) > self.totalHeadersSize:
            self._refuse(
                431, b"Request Header Fields Too Large", "the request headers are too large"
            )
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> Any:
        if self.in_request_head:
            self._refuse(431, b"Request Header Fields Too Large", "a request header is too large")
        else:
            self._refuse(414, b"Request-URI Too Long", "the request URI is too long")

    def allContentReceived(self) -> None:
        self._cancel_head_timer()
        super().allContentReceived()

    def bad_request(self) -> None:
        self._refuse(400, b"Bad Request", "malformed request")

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.handling_request and not self._refused:
            log.debug("a client took too long to send a request head; closing")
            self._refuse(408, b"Request Timeout", "the request head took too long to arrive")

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        self._refused = True
        self._cancel_head_timer()
        if self.transport is not None:
            self.transport.write(raw_error(status, reason, message))
        self.loseConnection()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_head_timer()
        super().connectionLost(reason)
