"""Blob senders of a fetch in flight: what a client receives while the blob is still
being downloaded. The "socket" is a pipe (``os.sendfile`` writes to any file), the
request a small stand-in with what the senders use of ``twisted.web.server.Request``."""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.server import Request

from regmirror.api.senders import (
    FollowingSender,
    FollowingSendfileSender,
    Sender,
    Streaming,
    make_sender,
)
from regmirror.domain.digest import Digest
from regmirror.fetch.blobfetch import BlobFetch, FetchFailed
from regmirror.fetch.writers import threaded_writers
from regmirror.mirror.sources import FollowedFetch
from regmirror.storage.store import Store


class Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class Channel:
    def __init__(self) -> None:
        self.transport = Transport()


class FakeRequest:
    """What the senders use of a ``Request``; ``body`` is what went through ``write``."""

    def __init__(self) -> None:
        self.channel: Channel | None = Channel()
        self.headers: dict[bytes, bytes] = {}
        self.code = 200
        self.body = b""
        self.sentLength = 0
        self.finished = False
        self.producer: Any = None
        self._finish: Deferred[None] = Deferred()

    def getHeader(self, name: bytes) -> bytes | None:
        return None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred[None]:
        return self._finish

    def write(self, data: bytes) -> None:
        self.body += data

    def finish(self) -> None:
        self.finished = True

    @property
    def aborted(self) -> bool:
        return self.channel is not None and self.channel.transport.aborted


class PipeSocket:
    """A ``ZeroCopySocket`` on the write end of a non-blocking pipe."""

    def __init__(self, capacity: int | None = None) -> None:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)
        os.set_blocking(self.read_end, False)
        if capacity is not None:
            fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, capacity)
        self.blocked = 0

    def fileno(self) -> int:
        return self.write_end

    def holds_data(self) -> bool:
        return False

    def when_writable(self) -> None:
        self.blocked += 1

    def drain(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = os.read(self.read_end, 1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path)
    s.prepare()
    return s


@pytest.fixture
def pipe() -> Iterator[PipeSocket]:
    p = PipeSocket()
    yield p
    p.close()


def _sender(
    fetch: BlobFetch, request: FakeRequest, socket: PipeSocket | None, released: list[int]
) -> Sender:
    assert fetch.size is not None
    source = FollowedFetch(fetch, fetch.open_reader(), fetch.size, lambda: released.append(1))
    streaming = Streaming(Clock(), 0.0, lambda r: socket)
    return make_sender(cast(Request, request), fetch.digest, source, streaming)


def test_a_plain_socket_follower_gets_what_is_on_disk_and_the_last_byte_once_verified(
    store: Store, pipe: PipeSocket
) -> None:
    data = bytes(range(256)) * 40
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    fetch.write(data[:1000])
    request, released = FakeRequest(), []
    sender = _sender(fetch, request, pipe, released)
    assert isinstance(sender, FollowingSendfileSender)
    sender.start()
    assert pipe.drain() == data[:1000]
    fetch.write(data[1000:-1])
    assert pipe.drain() == data[1000:-1]  # everything but the last byte
    assert not request.finished
    fetch.write(data[-1:])
    assert pipe.drain() == data[-1:]
    assert request.finished and not request.aborted
    assert request.sentLength == len(data) and request.body == b""
    assert released == [1]


def test_a_plain_socket_follower_is_cut_before_the_last_byte_of_a_wrong_body(
    store: Store, pipe: PipeSocket
) -> None:
    data = b"x" * 5000
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    request, released = FakeRequest(), []
    _sender(fetch, request, pipe, released).start()
    fetch.write(b"x" * 4999 + b"y")
    got = pipe.drain()
    assert got == b"x" * 4999  # never the last byte
    assert request.aborted and not request.finished
    assert released == [1]
    assert list(store.tmp.iterdir()) == [] and not store.blob_path(fetch.digest).exists()


def test_a_plain_socket_follower_is_cut_when_the_upstream_breaks(
    store: Store, pipe: PipeSocket
) -> None:
    data = b"z" * 5000
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    request, released = FakeRequest(), []
    _sender(fetch, request, pipe, released).start()
    fetch.write(data[:3000])
    fetch.fail(FetchFailed("the upstream connection broke"))
    assert pipe.drain() == data[:3000]
    assert request.aborted and not request.finished
    assert released == [1]


def test_a_full_socket_waits_for_the_transport_not_for_the_fetch(store: Store) -> None:
    pipe = PipeSocket(capacity=4096)
    try:
        data = os.urandom(64 * 1024)
        fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
        request, released = FakeRequest(), []
        sender = _sender(fetch, request, pipe, released)
        sender.start()
        fetch.write(data[: 32 * 1024])
        assert pipe.blocked == 1
        fetch.write(data[32 * 1024 :])  # more on disk: still waits for the socket
        assert pipe.blocked == 1
        got = b""
        while not request.finished:
            got += pipe.drain()
            assert request.producer is sender
            sender.resumeProducing()  # what the transport does once writable
        got += pipe.drain()
        assert got == data and not request.aborted
    finally:
        pipe.close()


def test_a_follower_without_a_plain_socket_reads_the_file(store: Store) -> None:
    data = b"abcdefghij" * 100
    fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
    request, released = FakeRequest(), []
    sender = _sender(fetch, request, None, released)
    assert isinstance(sender, FollowingSender)
    sender.start()
    fetch.write(data[:500])
    assert request.body == data[:500]
    fetch.write(data[500:-1])
    assert request.body == data[:-1] and not request.finished
    fetch.write(data[-1:])
    assert request.body == data and request.finished
    assert released == [1]


# -- with the production writer threads -------------------------------------------------


class ThreadReactor(Clock):
    """A clock whose ``callFromThread`` queues the call for the test thread to run."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: queue.SimpleQueue[tuple[Any, tuple[Any, ...]]] = queue.SimpleQueue()

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.put((f, args))


class Client:
    """A plain-socket follower of a fetch whose writer runs in threads; ``run`` plays the
    reactor (the writer's reports) and the client (draining the pipe, and resuming the
    sender as the transport would once the socket is writable)."""

    def __init__(self, fetch: BlobFetch, reactor: ThreadReactor, pipe: PipeSocket) -> None:
        self.fetch, self.reactor, self.pipe = fetch, reactor, pipe
        self.request = FakeRequest()
        self.released: list[int] = []
        self.sender = _sender(fetch, self.request, pipe, self.released)
        self.sender.start()
        self.received = b""

    def run(self) -> None:
        """Until the fetch is over and the client's answer ended (finished or cut)."""
        deadline = time.monotonic() + 20
        while not (self.fetch.done and (self.request.finished or self.request.aborted)):
            assert time.monotonic() < deadline, "the fetch or its reader is stuck"
            drained = self.pipe.drain()
            self.received += drained
            if self.pipe.blocked and self.request.producer is not None:
                self.pipe.blocked = 0
                self.sender.resumeProducing()
            try:  # wait for the writer threads only when the client has nothing to do
                f, args = self.reactor.calls.get(timeout=0 if drained else 0.05)
            except queue.Empty:
                continue
            f(*args)
        self.received += self.pipe.drain()


def _threaded_fetch(
    store: Store, data: bytes, digest: Digest | None = None
) -> tuple[BlobFetch, ThreadReactor]:
    reactor = ThreadReactor()
    fetch = BlobFetch(
        store,
        digest or Digest.of(data),
        len(data),
        fsync=True,
        writer=threaded_writers(reactor),
    )
    return fetch, reactor


MiB = 1024 * 1024


def test_threaded_writer_a_follower_gets_the_whole_verified_body(
    store: Store, pipe: PipeSocket
) -> None:
    data = os.urandom(3 * MiB + 123)
    fetch, reactor = _threaded_fetch(store, data)
    client = Client(fetch, reactor, pipe)
    for i in range(0, len(data), MiB):  # what BlobBody hands on: 1 MiB reads, uncopied
        fetch.write(data[i : i + MiB])
    client.run()
    assert client.request.finished and not client.request.aborted
    assert client.received == data
    assert store.blob_path(fetch.digest).read_bytes() == data
    assert client.released == [1]


def test_threaded_writer_a_wrong_body_is_cut_and_not_kept(store: Store, pipe: PipeSocket) -> None:
    data = os.urandom(3 * MiB)
    fetch, reactor = _threaded_fetch(store, data, Digest.of(b"something else" * 1000))
    client = Client(fetch, reactor, pipe)
    for i in range(0, len(data), MiB):
        fetch.write(data[i : i + MiB])
    client.run()
    assert fetch.failed and client.request.aborted and not client.request.finished
    assert len(client.received) < len(data)  # a broken transfer, never a complete body
    assert data.startswith(client.received)
    assert list(store.tmp.iterdir()) == [] and not store.blob_path(fetch.digest).exists()


def test_threaded_writer_disk_full_cuts_the_follower_and_keeps_nothing(
    store: Store, pipe: PipeSocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * MiB)
    fetch, reactor = _threaded_fetch(store, data)
    real_write, written = os.write, [0]

    def write(fd: int, b: Any) -> int:
        if fd == pipe.write_end:
            return real_write(fd, b)
        if written[0] >= MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, b)
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", write)
    client = Client(fetch, reactor, pipe)
    for i in range(0, len(data), MiB):
        fetch.write(data[i : i + MiB])
    client.run()
    monkeypatch.undo()
    assert fetch.failed and client.request.aborted and not client.request.finished
    assert data.startswith(client.received) and len(client.received) <= MiB
    assert list(store.tmp.iterdir()) == [] and not store.blob_path(fetch.digest).exists()


def test_threaded_writer_upstream_cut_mid_body_cuts_the_follower(
    store: Store, pipe: PipeSocket
) -> None:
    data = os.urandom(3 * MiB)
    fetch, reactor = _threaded_fetch(store, data)
    client = Client(fetch, reactor, pipe)
    fetch.write(data[:MiB])
    fetch.write(data[MiB : 2 * MiB])
    fetch.fail(FetchFailed("the upstream connection broke"))
    client.run()
    assert client.request.aborted and not client.request.finished
    assert data.startswith(client.received) and len(client.received) <= 2 * MiB
    assert list(store.tmp.iterdir()) == [] and not store.blob_path(fetch.digest).exists()
    assert client.released == [1]


def test_a_follower_whose_socket_is_full_is_cut_as_soon_as_the_fetch_fails(
    store: Store,
) -> None:
    pipe = PipeSocket(capacity=4096)
    try:
        data = os.urandom(64 * 1024)
        fetch = BlobFetch(store, Digest.of(data), len(data), fsync=False)
        request, released = FakeRequest(), []
        _sender(fetch, request, pipe, released).start()
        fetch.write(data[: 32 * 1024])
        assert pipe.blocked == 1 and not request.aborted  # the client reads nothing
        fetch.fail(FetchFailed("the upstream connection broke"))
        assert request.aborted and released == [1]  # not when the socket drains
    finally:
        pipe.close()
