"""Each reach into Twisted's internals (regmirror.http.internals), checked against the
Twisted installed: these fail when Twisted moves, renames or changes one of them."""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet import abstract, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.web.http import HTTPChannel, Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import directlyProvides

from regmirror.api.responses import gone
from regmirror.config import TLSConfig
from regmirror.http.internals import (
    UPSTREAM_READ_SIZE,
    ChannelInternals,
    TCPZeroCopy,
    TLSTransportInternals,
    enlarge_tcp_buffers,
    read_more_at_once,
    send_now,
    zero_copy_socket,
)
from regmirror.http.tls import ServerTLS, TLSFactory
from tests.support.certs import CA


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


class FDs:
    """What a tcp.Connection asks of its reactor (IReactorFDSet), recorded."""

    def __init__(self) -> None:
        self.writers: set[Any] = set()

    def addWriter(self, fd: Any) -> None:
        self.writers.add(fd)

    def removeWriter(self, fd: Any) -> None:
        self.writers.discard(fd)

    def addReader(self, fd: Any) -> None:
        pass

    def removeReader(self, fd: Any) -> None:
        pass


class Producer:
    resumed = 0

    def resumeProducing(self) -> None:
        self.resumed += 1

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest.fixture
def connection() -> Iterator[tuple[tcp.Connection, socket.socket, FDs]]:
    ours, theirs = socket.socketpair()
    reactor = FDs()
    conn = tcp.Connection(ours, Protocol(), reactor=reactor)  # type: ignore[arg-type]
    conn.connected = 1
    yield conn, theirs, reactor
    ours.close()
    theirs.close()


# -- sendfile -----------------------------------------------------------------------


def test_twisted_tcp_buffers_are_where_zero_copy_looks() -> None:
    for name in ("dataBuffer", "offset", "producerPaused", "bufferSize", "SEND_LIMIT"):
        assert hasattr(abstract.FileDescriptor, name), name
    assert parameters(abstract.FileDescriptor.startWriting) == ["self"]
    conn = tcp.Connection(socket.socket(), Protocol(), reactor=FDs())  # type: ignore[arg-type]
    assert conn._tempDataLen == 0
    conn.socket.close()


def test_zero_copy_sees_bytes_twisted_holds_and_is_resumed_once_they_are_sent(
    connection: tuple[tcp.Connection, socket.socket, FDs],
) -> None:
    conn, theirs, reactor = connection
    zero = TCPZeroCopy(conn)
    assert zero.fileno() == conn.socket.fileno()
    assert not zero.holds_data()
    conn.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert zero.holds_data()  # in _tempDataBuffer
    conn.doWrite()
    assert not zero.holds_data()
    assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    producer = Producer()
    conn.registerProducer(producer, True)
    zero.when_writable()
    assert conn in reactor.writers
    conn.doWrite()  # the socket is writable and Twisted's buffer empty: resume
    assert producer.resumed == 1
    assert conn not in reactor.writers


def test_zero_copy_is_only_for_a_plain_tcp_connection(
    connection: tuple[tcp.Connection, socket.socket, FDs],
) -> None:
    conn, _, _ = connection
    channel = DummyChannel()
    request = Request(channel)  # type: ignore[arg-type]
    assert zero_copy_socket(request) is None  # not a tcp.Connection
    channel.transport = conn  # type: ignore[assignment]
    assert isinstance(zero_copy_socket(request), TCPZeroCopy)
    directlyProvides(conn, ISSLTransport)
    assert zero_copy_socket(request) is None


def test_send_now_writes_to_an_empty_tcp_connection_at_once(
    connection: tuple[tcp.Connection, socket.socket, FDs],
) -> None:
    for name in ("_tempDataLen", "dataBuffer", "offset", "_writeDisconnected", "socket"):
        assert hasattr(connection[0], name), name
    conn, theirs, reactor = connection
    send_now(conn, b"HTTP/1.1 200 OK\r\n\r\n")
    assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert conn not in reactor.writers  # nothing left for the reactor to write


def test_send_now_leaves_to_the_transport_what_it_must_keep_in_order(
    connection: tuple[tcp.Connection, socket.socket, FDs],
) -> None:
    conn, theirs, reactor = connection
    conn.write(b"first ")  # held by the transport: what follows must queue behind it
    send_now(conn, b"second")
    assert conn in reactor.writers
    conn.doWrite()
    assert theirs.recv(100) == b"first second"
    theirs.setblocking(False)
    big = b"x" * (16 * 1024 * 1024)  # more than the socket takes: the rest is buffered
    send_now(conn, big)
    assert conn in reactor.writers and conn._tempDataLen + len(conn.dataBuffer) > 0
    received = b""
    while len(received) < len(big):
        try:
            received += theirs.recv(1 << 20)
        except BlockingIOError:
            conn.doWrite()
    assert received == big
    directlyProvides(conn, ISSLTransport)
    send_now(conn, b"tls")  # never straight to the socket of a TLS connection
    assert conn in reactor.writers


# -- TCP buffers --------------------------------------------------------------------


def test_read_more_at_once_finds_the_tcp_connection_under_a_response(
    connection: tuple[tcp.Connection, socket.socket, FDs],
) -> None:
    from twisted.web._newclient import TransportProxyProducer

    conn, _, _ = connection
    assert conn.bufferSize < UPSTREAM_READ_SIZE
    proxy = TransportProxyProducer(conn)
    assert proxy._producer is conn
    read_more_at_once(proxy)
    assert conn.bufferSize == UPSTREAM_READ_SIZE


def test_read_more_at_once_goes_through_tls_to_the_tcp_connection(
    connection: tuple[tcp.Connection, socket.socket, FDs],
) -> None:
    from twisted.web._newclient import TransportProxyProducer

    conn, _, _ = connection
    options = optionsForClientTLS("upstream.test", trustRoot=Certificate.loadPEM(CA().cert_pem))
    tls = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Protocol), Clock())
    protocol = tls.buildProtocol(None)
    protocol.makeConnection(conn)
    assert protocol.transport is conn
    read_more_at_once(TransportProxyProducer(protocol))
    assert conn.bufferSize == UPSTREAM_READ_SIZE


def test_tcp_buffers_can_be_enlarged(
    connection: tuple[tcp.Connection, socket.socket, FDs],
) -> None:
    conn, theirs, _ = connection
    assert isinstance(conn.bufferSize, int) and isinstance(conn.SEND_LIMIT, int)
    enlarge_tcp_buffers(conn, 1024 * 1024)
    assert conn.bufferSize == conn.SEND_LIMIT == 1024 * 1024
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    conn.write(os.urandom(512 * 1024))
    conn.doWrite()  # one send of more than Twisted's 128 KiB
    assert len(conn.dataBuffer) - conn.offset < 512 * 1024 - 128 * 1024


# -- HTTPChannel --------------------------------------------------------------------


class RecordingChannel(ChannelInternals):
    bad = 0

    def bad_request(self) -> None:
        self.bad += 1
        super().bad_request()


def channel() -> tuple[RecordingChannel, StringTransport]:
    ch = RecordingChannel()
    ch.requestFactory = lambda *a, **kw: Request(*a, **kw)  # never answers
    transport = StringTransport()
    ch.makeConnection(transport)
    return ch, transport


def test_the_http_channel_request_head_state_is_where_limits_look() -> None:
    assert parameters(HTTPChannel._respondToBadRequestAndDisconnect) == ["self"]
    ch, _ = channel()
    assert ch._handlingRequest is False and ch._receivedHeaderSize == 0
    assert not ch.handling_request and not ch.in_request_head
    assert ch.received_header_size == 0
    ch.dataReceived(b"GET /v2/ HTTP/1.1\r\n")
    assert ch.in_request_head and not ch.handling_request
    ch.dataReceived(b"Host: mirror\r\n")
    assert ch.received_header_size == len(b"GET /v2/ HTTP/1.1") + len(b"Host: mirror")
    ch.dataReceived(b"\r\n")
    assert ch.handling_request and not ch.in_request_head


def test_between_requests_is_true_only_when_nothing_of_a_request_is_pending() -> None:
    answered: list[Request] = []

    class Answering(Request):
        def process(self) -> None:
            answered.append(self)

    ch = ChannelInternals()
    ch.requestFactory = Answering
    transport = StringTransport()
    ch.makeConnection(transport)
    assert ch.between_requests
    ch.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: x")
    assert not ch.between_requests  # a head in part (the line parser's buffer)
    ch.dataReceived(b"\r\n\r\nGET /v2/a HTTP/1.1\r\n\r\n")
    assert not ch.between_requests  # one being answered, one more buffered
    assert len(answered) == 1
    seen: list[bool] = []
    process = Answering.process

    def replayed(self: Request) -> None:
        seen.append(ch.between_requests)
        process(self)

    Answering.process = replayed  # type: ignore[method-assign]
    answered[0].finish()  # the buffered request is replayed, from the line parser
    assert len(answered) == 2 and seen == [False]
    answered[1].finish()
    assert ch.between_requests
    ch.dataReceived(b"\r\n")  # an extra empty line, eaten once
    assert not ch.between_requests
    ch.dataReceived(b"GET /v2/ HTTP/1.0\r\n\r\n")
    answered[2].finish()
    assert not ch.between_requests  # HTTP/1.0: not persistent


def test_a_malformed_request_head_goes_to_bad_request() -> None:
    ch, transport = channel()
    ch.dataReceived(b"GET /v2/ HTTP/1.1\r\nno colon here\r\n\r\n")
    assert ch.bad == 1
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request")


# -- TLS ----------------------------------------------------------------------------


def test_the_tls_write_path_is_where_the_bulk_transport_hooks_in() -> None:
    assert parameters(BufferingTLSTransport._write) == ["self", "bytes"]
    assert parameters(BufferingTLSTransport._flushSendBIO) == ["self"]
    assert parameters(BufferingTLSTransport._bufferedWrite) == ["self", "octets"]
    assert parameters(BufferingTLSTransport._tlsShutdownFinished) == ["self", "reason"]
    assert BufferingTLSTransport._lostTLSConnection is False


def test_writes_and_bio_flushes_reach_the_hooks(tmp_path: Path) -> None:
    ca = CA()
    files = ca.issue("mirror", dns=("mirror.test",)).write(tmp_path, "server")
    assert files.cert_path and files.key_path
    tls = ServerTLS(TLSConfig(str(files.cert_path), str(files.key_path)))
    calls: list[str] = []
    connections: list[Any] = []

    class Recording(TLSTransportInternals):
        def write_plaintext(self, data: bytes) -> None:
            calls.append("write")
            connections.append(self.tls_connection)
            assert not self.tls_lost
            super().write_plaintext(data)

        def flush_send_bio(self) -> None:
            calls.append("flush")
            super().flush_send_bio()

    class Sender(Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"x" * 100_000)  # type: ignore[union-attr]

    received: list[bytes] = []

    class Receiver(Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    server_factory = TLSFactory(tls, Factory.forProtocol(Sender), Clock())
    server_factory.protocol = Recording
    client_factory = TLSMemoryBIOFactory(
        optionsForClientTLS("mirror.test", trustRoot=Certificate.loadPEM(ca.cert_pem)),
        True,
        Factory.forProtocol(Receiver),
        Clock(),
    )
    _, _, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
    )
    for _ in range(100):
        pump.pump()
    assert b"".join(received) == b"x" * 100_000
    assert "write" in calls and "flush" in calls
    assert all(isinstance(c, SSL.Connection) for c in connections)


# -- what the API relies on (regmirror.api.responses.gone) ----------------------------


def test_a_request_drops_its_channel_when_its_connection_is_lost() -> None:
    request = Request(DummyChannel())  # type: ignore[arg-type]
    assert request.channel is not None and not gone(request)
    request.connectionLost(Failure(ConnectionDone()))
    assert request.channel is None
    assert gone(request)
