"""The private coordinator of ``regmirror.workers``: a ``redis-server`` child.

Workers coordinate as the replicas of a cluster do (one upstream fetch per blob, one
tag check per window, one reaper), through Redis. When ``regmirror.cluster.redis`` is
configured they use that one; otherwise the parent starts this private ``redis-server``
(Debian's ``redis-server`` package; start-up says so in one line if it is missing):

- on 127.0.0.1, a port the kernel picked, with a random password (in a config file
  readable by this user only, and handed to the workers in their environment, never on
  a command line that ``ps`` shows): nothing else on the machine uses it;
- nothing persisted (``save ""``, ``appendonly no``): what it holds (leases, tag
  check times, last use) is rebuilt by the workers, and is worthless once they stop;
- started again when it dies (the workers fall back to local behaviour meanwhile and
  rejoin when it answers again); stopped after the workers when twistd stops, and by
  the kernel if twistd is killed (on Linux it is started through ``python -m
  regmirror.app.coordinator``, which asks for ``PR_SET_PDEATHSIG`` and then execs it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from regmirror import logs
from regmirror.app.workers import exit_text

log = logs.get_logger()

REDIS_SERVER = "redis-server"
READY_TIMEOUT = 10.0
RESTART_DELAY = 1.0


def find_redis_server() -> str | None:
    return shutil.which(REDIS_SERVER)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping(port: int, password: str, timeout: float = 0.5) -> bool:
    """Whether the server on ``port`` answers an authenticated PING (blocking, short)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(
                b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n"
                % (len(password), password.encode())
            )
            answer = b""
            while b"PONG" not in answer and len(answer) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                answer += chunk
            return b"+OK\r\n+PONG\r\n" in answer
    except OSError:
        return False


class _RedisProcess(ProcessProtocol):
    def __init__(self, owner: PrivateRedis) -> None:
        self._owner = owner
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.info("coordinator: {line}", line=line.strip())

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self._owner._ended(self, reason)
        self.ended.callback(None)


class PrivateRedis(service.Service):
    """A ``redis-server`` only this mirror's workers use; see the module docstring."""

    def __init__(self, reactor: Any, executable: str, env: Mapping[str, str]) -> None:
        self._reactor = reactor
        self._executable = executable
        self._env = dict(env)
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self._dir: Path | None = None
        self._process: _RedisProcess | None = None
        self._stopping = False
        self._restart: Any = None

    @property
    def url(self) -> str:
        """What the workers connect to (with the password: keep it out of logs)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._dir = Path(tempfile.mkdtemp(prefix="regmirror-coordinator-"))
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        if self._stopping or self._dir is None:
            return
        if not self.port or not self._port_free():
            self.port = free_loopback_port()
        conf = self._dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\n"
                f'requirepass {self.password}\nsave ""\nappendonly no\n'
                f"dir {self._dir}\ndaemonize no\nloglevel warning\n"
                "databases 1\n"
            )
        self._process = _RedisProcess(self)
        argv = [self._executable, str(conf)]
        if sys.platform == "linux":
            argv = [sys.executable, "-m", "regmirror.app.coordinator", *argv]
        self._reactor.spawnProcess(self._process, argv[0], argv, env=self._env)
        log.info(
            "coordinator: private redis-server on 127.0.0.1:{port} (pid {pid})",
            port=self.port,
            pid=getattr(self._process.transport, "pid", None),
        )

    def _port_free(self) -> bool:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", self.port))
            return True
        except OSError:
            return False

    async def ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Wait (polling) until the server answers, at most ``timeout`` seconds."""
        deadline = self._reactor.seconds() + timeout
        while self._reactor.seconds() < deadline:
            if self.port and ping(self.port, self.password):
                return True
            await deferLater(self._reactor, 0.05, lambda: None)
        return False

    def _ended(self, process: _RedisProcess, reason: Failure) -> None:
        if self._process is process:
            self._process = None
        if self._stopping:
            return
        log.error(
            "coordinator: redis-server exited ({how}); workers run on their own until it "
            "is back; starting it again in {delay:g} s",
            how=exit_text(reason),
            delay=RESTART_DELAY,
        )
        self._restart = self._reactor.callLater(RESTART_DELAY, self._spawn)

    def stop_restarting(self) -> None:
        """Twistd is stopping: a server that exits now is not started again."""
        self._stopping = True

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.stop_restarting()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        process = self._process
        done: Deferred[Any] = succeed(None)
        if process is not None and process.transport is not None:
            try:
                process.transport.signalProcess(signal.SIGTERM.name[3:])
            except (ProcessExitedAlready, OSError):
                pass
            done = process.ended
        return done.addBoth(self._cleanup)

    def _cleanup(self, result: object) -> object:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return result


def exec_dying_with_parent(argv: list[str]) -> None:  # pragma: no cover - replaces itself
    """Exec ``argv`` so that the kernel sends it SIGTERM when this process's parent dies
    (Linux's ``PR_SET_PDEATHSIG`` survives exec)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the request
        raise SystemExit(1)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    exec_dying_with_parent(sys.argv[1:])
