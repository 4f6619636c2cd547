"""A black-holed upstream: a loopback port that accepts connections and never answers.

What a hung registry or a silently dropping firewall looks like to a client once the
TCP handshake is done: requests go in, nothing ever comes back. A background thread
accepts (so connects succeed at once and are counted), reads and discards what clients
send, and never writes a byte. ``stop()`` closes the listener and every connection.
"""

from __future__ import annotations

import selectors
import socket
import threading
from typing import Self

from tests.support.ports import LOOPBACK


class BlackHole:
    def __init__(self, *, host: str = LOOPBACK, port: int = 0) -> None:
        self.bind_host = host
        self.port = port
        self.connections = 0  # accepted so far
        self.bytes_received = 0
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.bind_host}:{self.port}"

    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self.port}"

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("the black hole is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, args=(listener,), name=f"black-hole:{self.port}", daemon=True
        )
        self._thread.start()

    def _run(self, listener: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        clients: list[socket.socket] = []
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is listener:
                        try:
                            conn, _ = listener.accept()
                        except BlockingIOError:
                            continue
                        conn.setblocking(False)
                        clients.append(conn)
                        sel.register(conn, selectors.EVENT_READ)
                        with self._lock:
                            self.connections += 1
                        continue
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        with self._lock:
                            self.bytes_received += len(data)
                    else:  # the client gave up: forget it
                        sel.unregister(sock)
                        clients.remove(sock)
                        sock.close()
        finally:
            for conn in clients:
                conn.close()
            sel.close()

    def stop(self) -> None:
        """Close the listener and every connection. Idempotent."""
        listener, thread = self._listener, self._thread
        if listener is None:
            return
        self._stopping.set()
        if thread is not None:
            thread.join(10)
        listener.close()
        self._listener = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
