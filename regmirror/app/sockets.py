"""The listening sockets of ``regmirror.workers``: bound by the parent, handed down.

With ``workers: N > 1`` the parent process binds the listener once (before twistd
drops privileges, so a port below 1024 works as it does with one process; a port in
use stops twistd with one line), then hands each worker its socket as file descriptor
3, which the worker adopts (``reactor.adoptStreamPort``). On TCP the parent binds one
socket per worker, all on the same address with ``SO_REUSEPORT``: the kernel spreads
new connections evenly over them (by a hash of the addresses), and a worker that dies
loses only the connections it had accepted; those queued on its socket wait for the
worker that replaces it (the parent keeps the socket open). A unix socket cannot be
balanced that way, so every worker shares one (the first worker back in ``accept``
takes the next connection). docs/scaling.md gives the reasons and the costs.

``ListenAddress.parse`` reads the endpoint description that
``regmirror.config.listen_endpoint`` writes (``tcp:PORT``, ``tcp:PORT:interface=IP``,
``tcp6:PORT:interface=IP``, ``unix:PATH``); nothing else reaches it.
"""

from __future__ import annotations

import re
import socket
from typing import Literal

import attrs

BACKLOG = 511
Family = Literal["inet", "inet6", "unix"]
FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


@attrs.frozen
class ListenAddress:
    family: Family
    host: str  # the path for unix
    port: int = 0

    @classmethod
    def parse(cls, description: str) -> ListenAddress:
        kind, _, rest = description.partition(":")
        if kind == "unix":
            return cls("unix", _unescape(rest))
        parts = re.split(r"(?<!\\):", rest)
        if kind not in ("tcp", "tcp6") or not parts[0].isdigit():
            raise ValueError(f"not a listener regmirror writes: {description!r}")
        host = ""
        for option in parts[1:]:
            key, _, value = option.partition("=")
            if key == "interface":
                host = _unescape(value)
        family: Family = "inet6" if kind == "tcp6" or ":" in host else "inet"
        return cls(family, host, int(parts[0]))

    @property
    def reuse_port(self) -> bool:
        """One socket per worker (kernel-balanced), or one shared by all."""
        return self.family != "unix" and hasattr(socket, "SO_REUSEPORT")

    def bind(self, reuse_port: bool = False) -> socket.socket:
        """A listening socket, inheritable (a child gets it as an open descriptor)."""
        sock = socket.socket(FAMILIES[self.family], socket.SOCK_STREAM)
        try:
            if self.family == "unix":
                sock.bind(self.host)  # a file there: in use, as with one process
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if self.family == "inet6":
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((self.host, self.port))
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
        except BaseException:
            sock.close()
            raise
        return sock

    def bind_all(self, workers: int) -> list[socket.socket]:
        """The sockets of ``workers`` workers: one each with ``SO_REUSEPORT`` (the first
        binds the port, the others join it), else one for all (repeated)."""
        if not self.reuse_port:
            return [self.bind()] * workers
        first = self.bind(reuse_port=True)
        out = [first]
        try:
            port = first.getsockname()[1]
            for _ in range(workers - 1):
                out.append(attrs.evolve(self, port=port).bind(reuse_port=True))
        except BaseException:
            for sock in out:
                sock.close()
            raise
        return out


@attrs.frozen
class Inherited:
    """The listening socket a worker was given (descriptor ``fd``), and which worker it
    is (named in the ``Server`` header of its responses)."""

    fd: int
    family: Family
    worker: int
