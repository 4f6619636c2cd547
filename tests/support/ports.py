"""Free loopback ports for servers started by tests and benchmarks."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    The kernel picks it (bind to port 0); the socket is closed before returning, so
    another process may in principle take it before the caller binds it. Servers that
    can report their own port (asyncio, Twisted) should bind port 0 themselves instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port
