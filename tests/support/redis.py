"""A real ``redis-server`` (Debian's) on a free loopback port, for the cluster's tests.

It keeps nothing on disk (``--save "" --appendonly no``): a restart is an empty Redis,
the worst case a cluster must survive. ``stop()`` sends SIGTERM to its PID, ``kill9()``
SIGKILL; ``start()`` again brings it back on the same port. ``client()`` is a minimal
synchronous RESP client for tests to look at what the replicas wrote.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from tests.support.ports import LOOPBACK, free_port
from tests.support.process import ManagedProcess, require_tool, tail
from tests.support.wait import poll_until


class RedisServer:
    def __init__(self, base_dir: Path, *, port: int | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.log_path = self.base_dir / "redis.log"
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def argv(self) -> list[str]:
        return [
            require_tool("redis-server"),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.base_dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip

    def start(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._process = ManagedProcess(
            self.argv(), stdout_path=self.log_path, stderr_path=self.log_path, name="redis-server"
        )
        self._process.start()

        def ready() -> bool:
            if not self.running:
                raise RuntimeError(f"redis-server exited:\n{tail(self.log_path)}")
            try:
                return self.client().call("PING") == "PONG"
            except OSError:
                return False

        poll_until(ready, 10, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    def kill9(self) -> None:
        if self._process is not None:
            self._process.kill9()

    def client(self) -> RespClient:
        return RespClient(LOOPBACK, self.port)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RespClient:
    """One command per connection, replies parsed (RESP2): enough for a test's look."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def call(self, *args: object) -> Any:
        parts = [str(a).encode() for a in args]
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            sock.sendall(request)
            reader = sock.makefile("rb")
            return _read(reader)


def _read(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = reader.read(n + 2)[:-2]
        return data.decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read(reader) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")
