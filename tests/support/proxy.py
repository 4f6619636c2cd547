"""A counting TCP proxy between the mirror and its upstream, in a background thread.

It forwards bytes unchanged and counts them: ``bytes_down`` (upstream -> client) and
``bytes_up``, ``connections`` accepted, ``active_connections``. Optionally it caps
the downstream rate (bytes/s, one token bucket shared by all connections) to imitate
a WAN link for benchmarks.

It also reads the HTTP/1.1 request heads going upstream (``requests``) without
changing them, so a test can count upstream requests at the moment they are *sent*
(a registry's own log line is only written after the response) and see the headers a
client sends (``Accept``...). Request bodies are skipped by ``Content-Length``; a
chunked request body stops the sniffing on that connection (counting goes on).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from tests.support.ports import LOOPBACK
from tests.support.rawhttp import split_base_url

T = TypeVar("T")

_CHUNK = 64 * 1024
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class SniffedRequest:
    """The head of a request that went through the proxy towards the upstream."""

    method: str
    target: str
    headers: dict[str, str] = field(repr=False)  # lower-case names
    connection: int  # 1-based number of the proxied connection
    time: float  # time.monotonic() when the head was complete


class _RequestSniffer:
    def __init__(self, connection: int, record: Callable[[SniffedRequest], None]) -> None:
        self.connection = connection
        self.record = record
        self.buffer = b""
        self.body_left = 0
        self.enabled = True

    def feed(self, data: bytes) -> None:
        while self.enabled and data:
            if self.body_left:
                skip = min(self.body_left, len(data))
                self.body_left -= skip
                data = data[skip:]
                continue
            self.buffer += data
            data = b""
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self.enabled = False
                return
            head, data = self.buffer[:end], self.buffer[end + 4 :]
            self.buffer = b""
            self._parse(head)

    def _parse(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        while lines and not lines[0]:  # tolerate stray CRLF between requests
            lines.pop(0)
        if not lines:
            return
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self.enabled = False
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        self.record(SniffedRequest(parts[0], parts[1], headers, self.connection, time.monotonic()))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.enabled = False
        else:
            try:
                self.body_left = int(headers.get("content-length", "0") or 0)
            except ValueError:
                self.enabled = False


class _TokenBucket:
    """A shared rate cap: each consumer takes tokens, running into debt, and sleeps it off.

    Debt accumulates across consumers, so the aggregate rate is the cap however many
    connections share it. Only used from the proxy's event loop thread.
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class _CountingBase:
    """What both proxies count and how they are addressed: the byte and connection
    counters, the request heads sniffed on the way up, ``url``/``host``, and ``with``."""

    def __init__(self, target_host: str, target_port: int, *, sniff_requests: bool) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.sniff_requests = sniff_requests
        self.port = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self.active_connections = 0
        self.failed_connects = 0
        self._requests: list[SniffedRequest] = []
        self._lock = threading.Lock()

    @classmethod
    def to_url(cls, url: str, **kwargs: Any) -> Self:
        """A proxy in front of ``http://host:port``."""
        host, port = split_base_url(url)
        return cls(host, port, **kwargs)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_down = self.bytes_up = 0
            self.connections = self.failed_connects = 0
            self._requests.clear()

    @property
    def requests(self) -> list[SniffedRequest]:
        """Request heads sent upstream so far, in order."""
        with self._lock:
            return list(self._requests)

    def count_requests(self, method: str | None = None, path_substring: str = "") -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and path_substring in r.target
        )

    def _record(self, request: SniffedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class CountingProxy(_CountingBase):
    """``start()`` listens on a free 127.0.0.1 port and forwards to ``target_host:port``.

    Counters are plain attributes written by the proxy thread; reading them from the
    test thread is safe. ``stop()`` closes the listener and every connection.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rate_limit: float | None = None,
        sniff_requests: bool = True,
    ) -> None:
        super().__init__(target_host, target_port, sniff_requests=sniff_requests)
        self.rate_limit = rate_limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._bucket: _TokenBucket | None = None
        self._hold_at: int | None = None
        self._released: asyncio.Event | None = None

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the proxy is already running")
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(loop, started), name=f"CountingProxy->{self.target_port}"
        )
        self._thread.daemon = True
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the proxy's event loop did not start")
        self._call(self._listen())

    def _run(self, loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        if self.rate_limit:
            self._bucket = _TokenBucket(self.rate_limit, max(_CHUNK, self.rate_limit / 20))
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port or 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and all connections, end the thread. Idempotent."""
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
            self._loop = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- controls ---------------------------------------------------------------

    def close_connections(self) -> None:
        """Abort every proxied connection now (the listener stays open)."""
        if self._loop is not None:

            async def close() -> None:
                self._close_all()

            self._call(close())

    def _close_all(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()

    def set_rate_limit(self, rate: float | None) -> None:
        """Change the downstream cap (bytes/s, ``None``: unlimited) while running."""
        self.rate_limit = rate

        async def apply() -> None:
            self._bucket = _TokenBucket(rate, max(_CHUNK, rate / 20)) if rate else None

        if self._loop is not None:
            self._call(apply())

    def hold_downstream_after(self, n_bytes: int) -> None:
        """Stop forwarding upstream -> client once ``bytes_down`` reaches ``n_bytes``
        (all connections), until ``release()``. Lets a test freeze a download mid-way."""

        async def hold() -> None:
            self._hold_at = n_bytes
            self._released = asyncio.Event()

        self._call(hold())

    def release(self) -> None:
        """Let held downstream traffic flow again."""

        async def release() -> None:
            self._hold_at = None
            if self._released is not None:
                self._released.set()

        if self._loop is not None:
            self._call(release())

    @property
    def holding(self) -> bool:
        """Whether downstream traffic is stopped at the hold point right now."""
        return self._hold_at is not None and self.bytes_down >= self._hold_at

    # --- observations -----------------------------------------------------------

    # --- forwarding -------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.active_connections += 1
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self.failed_connects += 1
                return
            self._writers.add(up_writer)
            sniffer = _RequestSniffer(number, self._record) if self.sniff_requests else None
            await asyncio.gather(
                self._pump(reader, writer, up_writer, upstream=True, sniffer=sniffer),
                self._pump(up_reader, up_writer, writer, upstream=False, sniffer=None),
            )
        except asyncio.CancelledError:
            pass
        finally:
            self.active_connections -= 1
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _forward_down(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        while data:
            if self._hold_at is not None and self.bytes_down >= self._hold_at:
                assert self._released is not None
                await self._released.wait()
                continue
            n = len(data)
            if self._hold_at is not None:
                n = min(n, self._hold_at - self.bytes_down)
            if self._bucket is not None:
                await self._bucket.take(n)
            self.bytes_down += n
            writer.write(data[:n])
            data = data[n:]
            await writer.drain()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        reader_side: asyncio.StreamWriter,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
        sniffer: _RequestSniffer | None,
    ) -> None:
        """Copy ``reader`` to ``writer`` until EOF; ``reader_side`` is the reader's own
        connection (aborted too if either side fails)."""
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if upstream:
                    if sniffer is not None:
                        sniffer.feed(data)
                    self.bytes_up += len(data)
                else:
                    await self._forward_down(data, writer)
                    continue
                writer.write(data)
                await writer.drain()
            # Half-close: pass the EOF on, keep the other direction running.
            if not writer.transport.is_closing() and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            # One side went away: cut both, like a broken network path would.
            writer.transport.abort()
            reader_side.transport.abort()


# --- a lean counting proxy: splice(2), in threads ----------------------------------------

_SPLICE_CHUNK = 1024 * 1024  # one pipe's worth (F_SETPIPE_SZ), per splice(2) call


class _BlockingBucket:
    """``_TokenBucket`` for threads: ``take`` sleeps off the debt outside the lock."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            debt = -self.tokens
        if debt > 0:
            time.sleep(debt / self.rate)


class SpliceProxy(_CountingBase):
    """A counting TCP proxy that stays out of the way: the upstream -> client bytes move
    with ``splice(2)`` through a 1 MiB pipe, never through Python, so the proxy runs at
    several GB/s on loopback where ``CountingProxy`` (asyncio, copies) tops out near
    600 MiB/s. Meant for benchmarks; tests that need ``hold_downstream_after`` use
    ``CountingProxy``.

    The same counters and observations as ``CountingProxy``: ``bytes_down`` (counted
    after each splice into the client socket, so live during a transfer), ``bytes_up``,
    ``connections``, ``active_connections``, ``failed_connects``, ``requests`` /
    ``count_requests`` (request heads read from the client -> upstream direction,
    which is copied through Python: requests are small), and ``set_rate_limit`` (one
    token bucket over all connections, taken after each read: bursts of 1 MiB).

    Two threads per proxied connection, one per direction, with blocking sockets;
    ``stop()`` shuts every socket down, which wakes them, and joins them.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rate_limit: float | None = None,
        sniff_requests: bool = True,
    ) -> None:
        super().__init__(target_host, target_port, sniff_requests=sniff_requests)
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._stopping = False
        self._bucket: _BlockingBucket | None = None
        self.rate_limit: float | None = None
        self.set_rate_limit(rate_limit)

    def __repr__(self) -> str:
        return f"<SpliceProxy {self.host} -> {self.target_host}:{self.target_port}>"

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("the proxy is already running")
        self._stopping = False
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept, args=(listener,), name=f"SpliceProxy:{self.port}", daemon=True
        )
        self._accept_thread.start()

    def stop(self) -> None:
        """Close the listener and every connection, join the threads. Idempotent."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping = True
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(10)
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            _shutdown(sock)
        for thread in threads:
            thread.join(10)

    # --- controls and observations ----------------------------------------------

    def set_rate_limit(self, rate: float | None) -> None:
        """Cap the downstream rate (bytes/s, ``None``: unlimited), also while running."""
        self.rate_limit = rate
        self._bucket = _BlockingBucket(rate, max(_SPLICE_CHUNK, rate / 20)) if rate else None

    def close_connections(self) -> None:
        """Cut every proxied connection now (the listener stays open)."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    # --- forwarding -------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=self._run_tracked, args=(target, *args), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run_tracked(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            self._spawn(self._serve, client, number)

    def _serve(self, client: socket.socket, number: int) -> None:
        with self._lock:
            self.active_connections += 1
            self._sockets.add(client)
        up: socket.socket | None = None
        try:
            try:
                up = socket.create_connection((self.target_host, self.target_port), timeout=10)
            except OSError:
                with self._lock:
                    self.failed_connects += 1
                return
            up.settimeout(None)
            with self._lock:
                self._sockets.add(up)
            if self._stopping:
                return
            for sock in (client, up):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sniffer = _RequestSniffer(number, self._record) if self.sniff_requests else None
            upward = threading.Thread(target=self._pump_up, args=(client, up, sniffer), daemon=True)
            upward.start()
            self._pump_down(up, client)
            upward.join()
        finally:
            with self._lock:
                self.active_connections -= 1
                self._sockets.discard(client)
                if up is not None:
                    self._sockets.discard(up)
            client.close()
            if up is not None:
                up.close()

    def _pump_up(
        self, client: socket.socket, up: socket.socket, sniffer: _RequestSniffer | None
    ) -> None:
        """Client -> upstream, through Python (request heads are read on the way)."""
        try:
            while True:
                data = client.recv(_CHUNK)
                if not data:
                    break
                if sniffer is not None:
                    sniffer.feed(data)
                with self._lock:
                    self.bytes_up += len(data)
                up.sendall(data)
            up.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            _shutdown(client)
            _shutdown(up)

    def _pump_down(self, up: socket.socket, client: socket.socket) -> None:
        """Upstream -> client with splice(2): socket -> pipe -> socket, no copy."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _SPLICE_CHUNK)
                chunk = _SPLICE_CHUNK
            except OSError:  # above /proc/sys/fs/pipe-max-size
                chunk = 64 * 1024
            src, dst = up.fileno(), client.fileno()
            while True:
                n = os.splice(src, write_end, chunk)
                if n == 0:
                    break
                bucket = self._bucket
                if bucket is not None:
                    bucket.take(n)
                left = n
                while left:
                    left -= os.splice(read_end, dst, left)
                with self._lock:
                    self.bytes_down += n
            client.shutdown(socket.SHUT_WR)
        except OSError:
            _shutdown(client)
            _shutdown(up)
        finally:
            os.close(read_end)
            os.close(write_end)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
