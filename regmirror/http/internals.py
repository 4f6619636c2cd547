"""Every reach into Twisted's private (or undocumented) attributes, in one module.

What regmirror does faster or stricter than Twisted lets it through public API needs a
few of Twisted's internals; they are all here, each named for what it gives, and each
has a test in tests/unit/test_internals.py that fails when Twisted moves it. Nothing
else in regmirror touches a Twisted attribute that starts with an underscore.

- ``zero_copy_socket``: a request's plain TCP socket, for ``os.sendfile``: whether the
  transport still holds bytes, and how to have it resume its producer once writable
  (``FileDescriptor._tempDataLen``, ``dataBuffer``, ``offset``, ``producerPaused``);
- ``read_more_at_once``: the TCP connection under an upstream response reads more per
  call (``TransportProxyProducer._producer``, ``FileDescriptor.bufferSize``);
- ``enlarge_tcp_buffers``: the TCP transport under TLS holds and sends more per call
  (``bufferSize``, ``SEND_LIMIT``);
- ``send_now``: a response written to a plain TCP socket at once when the transport
  holds nothing (``FileDescriptor._tempDataLen``, ``dataBuffer``, ``offset``,
  ``_writeDisconnected``, ``socket``), not on the reactor's next write turn;
- ``ChannelInternals``: ``HTTPChannel``'s request-head state, whether it is between two
  requests, and its bad-request hook, under public names (``_handlingRequest``,
  ``_command``, ``_receivedHeaderSize``, ``_dataBuffer``, ``_waitingForTransport``,
  ``LineReceiver._buffer`` and ``_busyReceiving``, ``__first_line``,
  ``_respondToBadRequestAndDisconnect``);
- ``TLSTransportInternals``: ``BufferingTLSTransport``'s write path, under public names
  (``_write``, ``_flushSendBIO``, ``_tlsConnection``, ``_lostTLSConnection``,
  ``_bufferedWrite``, ``_tlsShutdownFinished``).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

UPSTREAM_READ_SIZE = 1024 * 1024

# -- sendfile -----------------------------------------------------------------------


class TCPZeroCopy:
    """A plain TCP transport seen as a socket ``os.sendfile`` writes to (see
    ``regmirror.api.senders.ZeroCopySocket``)."""

    def __init__(self, transport: tcp.Connection) -> None:
        self._transport = transport

    def fileno(self) -> int:
        return int(self._transport.fileno())

    def holds_data(self) -> bool:
        t = self._transport
        return bool(t._tempDataLen or len(t.dataBuffer) > t.offset)

    def when_writable(self) -> None:
        # doWrite resumes a paused streaming producer (the HTTP channel, which resumes
        # the request's) once the buffer it flushed is empty and the socket writable.
        self._transport.producerPaused = True
        self._transport.startWriting()


def zero_copy_socket(request: Request) -> TCPZeroCopy | None:
    """The request's TCP connection, if nothing (TLS) stands between it and the socket."""
    transport = getattr(request.channel, "transport", None)
    if isinstance(transport, tcp.Connection) and not ISSLTransport.providedBy(transport):
        return TCPZeroCopy(transport)
    return None


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but on a plain TCP connection whose buffer is empty the
    bytes go to the socket at once: a small response then costs one ``send`` instead of
    a write registration with the reactor and a ``send`` on its next turn. What the
    socket does not take (or any error) goes through ``transport.write``, so the
    transport's own buffering, producer pausing and error handling apply as usual."""
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and len(transport.dataBuffer) <= transport.offset
        and not ISSLTransport.providedBy(transport)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or an error the transport reports when it writes
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


# -- TCP buffers --------------------------------------------------------------------


def read_more_at_once(transport: object, size: int = UPSTREAM_READ_SIZE) -> None:
    """Let the TCP connection under an upstream blob response read ``size`` bytes per
    call instead of Twisted's 64 KiB. With many clients reading the fetch, the reactor
    sends up to 128 KiB per client per loop; reading 64 KiB per loop from the upstream
    would starve the download (one upstream read for 32 client writes)."""
    for _ in range(4):  # TransportProxyProducer -> (TLS ->) tcp.Client
        if isinstance(transport, tcp.Connection):
            transport.bufferSize = max(transport.bufferSize, size)
            return
        transport = getattr(transport, "_producer", None) or getattr(transport, "transport", None)


def enlarge_tcp_buffers(transport: Any, size: int) -> None:
    """Let a TCP transport hold ``size`` bytes before it pauses its producer, and send
    up to that much per system call (Twisted: 64 KiB and 128 KiB)."""
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = size
        transport.SEND_LIMIT = size


# -- HTTPChannel --------------------------------------------------------------------


class ChannelInternals(HTTPChannel):
    """``HTTPChannel`` with the state of the request head it is reading, and its hook
    for a malformed request, under public names."""

    @property
    def handling_request(self) -> bool:
        """A request's head was received in full and it is being answered."""
        return bool(self._handlingRequest)

    @property
    def in_request_head(self) -> bool:
        """The request line was received; header lines are being read."""
        return hasattr(self, "_command")

    @property
    def between_requests(self) -> bool:
        """Waiting for a new request line: nothing of a request received or buffered,
        no request being answered or queued, not inside the line parser (a pipelined
        request replayed from it), reading not paused, the connection persistent."""
        return bool(
            not self._handlingRequest
            and not self.requests
            and self.persistent
            and self.line_mode
            and not self._buffer
            and not self._busyReceiving
            and not self.paused
            and not self._dataBuffer
            and not self._waitingForTransport
            and self._HTTPChannel__first_line == 1  # type: ignore[attr-defined]
        )

    @property
    def received_header_size(self) -> int:
        """Bytes of the current request head so far."""
        return int(self._receivedHeaderSize)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()

    def bad_request(self) -> None:
        """A malformed request head (Twisted: a bare 400, then close)."""
        super()._respondToBadRequestAndDisconnect()


# -- TLS ----------------------------------------------------------------------------


class TLSTransportInternals(BufferingTLSTransport):
    """``BufferingTLSTransport``'s write path under public names: override
    ``write_plaintext`` (every write that reaches OpenSSL) and ``flush_send_bio``."""

    def _write(self, bytes: bytes) -> None:
        self.write_plaintext(bytes)

    def _flushSendBIO(self) -> None:
        self.flush_send_bio()

    def write_plaintext(self, data: bytes) -> None:
        super()._write(data)

    def flush_send_bio(self) -> None:
        super()._flushSendBIO()

    @property
    def tls_connection(self) -> SSL.Connection:
        return self._tlsConnection

    @property
    def tls_lost(self) -> bool:
        return bool(self._lostTLSConnection)

    def buffer_plaintext(self, data: bytes) -> None:
        """Keep ``data`` until OpenSSL can take it (it wants to read first)."""
        self._bufferedWrite(data)

    def tls_failed(self, failure: Failure) -> None:
        """OpenSSL failed: close as Twisted does."""
        self._tlsShutdownFinished(failure)
