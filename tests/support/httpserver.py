"""A small threaded HTTP server on loopback, the base of the HTTP fixtures.

``LoopbackHTTPServer`` binds port 0 itself (no race for a free port), serves from a
background thread, and on ``stop()`` closes the listener *and* every connection still
open (keep-alive clients such as regmirror's connection pool would otherwise keep a
handler thread alive). Subclasses set ``handler_class``; the handler reaches its
fixture as ``self.server.owner``.

Handlers speak HTTP/1.1 with keep-alive, so every response must carry a
``Content-Length`` (``send_body`` does it).
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

from tests.support.ports import LOOPBACK


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, owner: Any) -> None:
        self.owner = owner
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (keep-alive closed, stop()) is not an error worth a
        traceback on stderr; anything else still is."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, no stderr logging, a helper for complete responses."""

    protocol_version = "HTTP/1.1"
    server: _Server

    @property
    def owner(self) -> Any:
        return self.server.owner

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_body(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        content_type: str | None = "application/json",
    ) -> None:
        """Send a whole response; for ``HEAD`` the headers only (same Content-Length)."""
        self.send_response(status)
        if content_type and body:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def request_headers(self) -> dict[str, str]:
        """The request's headers, names lower-cased (repeated ones joined by ``, ``)."""
        out: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            out[key] = f"{out[key]}, {value}" if key in out else value
        return out


class LoopbackHTTPServer:
    """Base class of the threaded HTTP fixtures: ``start()``, ``stop()``, ``url``."""

    handler_class: ClassVar[type[QuietHandler]] = QuietHandler
    thread_name: ClassVar[str] = "http-fixture"

    def __init__(self, *, host: str = LOOPBACK, port: int = 0) -> None:
        self.bind_host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """``HOST:PORT``."""
        return f"{self.bind_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.bind_host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        server = _Server((self.bind_host, self.port), self.handler_class, self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.thread_name}:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close the listener and every open connection. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        with server.sockets_lock:
            open_sockets = list(server.open_sockets)
        for sock in open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if thread is not None:
            thread.join(10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
