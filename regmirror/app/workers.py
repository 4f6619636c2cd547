"""``regmirror.workers: N``: the parent process that runs N worker processes.

``twistd regmirror`` stays the one entry point. With ``workers > 1`` its service tree
is this supervisor (and the private coordinator, ``regmirror.app.coordinator``, when no
``regmirror.cluster.redis`` is configured) instead of a mirror:

- it binds the listener before twistd drops privileges (``regmirror.app.sockets``);
- it starts N workers (``python -m regmirror.app.worker``), each a full mirror that
  coordinates with the others as replicas of a cluster do, each given its listening
  socket as descriptor 3;
- a worker's log events come back as JSON lines on its stdout and go into twistd's
  log, their system marked ``wN/``; what it writes to stderr is logged as an error;
- a worker that exits while the service runs is logged as an error and started again
  (after 1 s, doubling to 5 s while it keeps dying within 30 s of its start);
- SIGHUP is passed on to every worker (each reloads its TLS files and htpasswd);
- stopping (SIGTERM to twistd) sends SIGTERM to every worker and waits until all have
  exited (SIGKILL after ``stop_timeout``); a worker whose parent died sees its stdin
  reach end of file and stops by itself, so nothing is left behind either way.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from regmirror import logs
from regmirror.app.sockets import ListenAddress

log = logs.get_logger()

RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 5.0
STABLE_AFTER = 30.0  # a worker that ran this long gets the short delay again
STOP_TIMEOUT = 15.0
WORKER_FD = 3

COORDINATOR_ENV = "REGMIRROR_COORDINATOR"  # a private coordinator's URL, for a worker

Spawn = Callable[..., IProcessTransport]
Command = Callable[[int], Sequence[str]]


class Coordinator(Protocol):
    """What the workers coordinate through when no ``regmirror.cluster.redis`` is
    configured (``regmirror.app.coordinator.PrivateRedis``): started before them,
    stopped after them."""

    @property
    def url(self) -> str: ...

    def startService(self) -> None: ...

    def stopService(self) -> Deferred[Any]: ...

    def ready(self) -> Coroutine[Any, Any, bool]: ...

    def stop_restarting(self) -> None: ...


def relay_line(index: int, line: bytes) -> None:
    """Publish one line of a worker's stdout in this process's log: a JSON event as the
    worker logged it (its system marked with the worker), anything else as text."""
    text = line.strip(b"\x1e\r\n ").decode("utf-8", "replace")
    if not text:
        return
    try:
        event = eventFromJSON(text)
    except (ValueError, TypeError, KeyError):
        event = None
    if not isinstance(event, dict):
        log.info("worker {index}: {line}", index=index, line=text)
        return
    level = event.get("log_level")
    level_name = getattr(level, "name", "-")
    system = event.get("log_system")
    if not isinstance(system, str):
        system = f"{event.get('log_namespace', '-')}#{level_name}"
    event["log_system"] = f"w{index}/{system}"
    globalLogPublisher(event)


class _Lines:
    """Splits a byte stream into lines; holds at most ``limit`` bytes of a partial one."""

    def __init__(self, emit: Callable[[bytes], None], limit: int = 1 << 20) -> None:
        self._emit = emit
        self._limit = limit
        self._partial = b""

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            self._emit(line)
        if len(self._partial) > self._limit:
            self._emit(self._partial)
            self._partial = b""

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = b""


class WorkerProcess(ProcessProtocol):
    """One worker as the parent sees it: its output relayed, its end reported."""

    def __init__(self, index: int, on_ended: Callable[[WorkerProcess, Failure], None]) -> None:
        self.index = index
        self.pid: int | None = None  # once spawned
        self.started_at = 0.0
        self.ended: Deferred[None] = Deferred()
        self._on_ended = on_ended
        self._out = _Lines(lambda line: relay_line(index, line))
        self._err = _Lines(self._stderr_line)

    def _stderr_line(self, line: bytes) -> None:
        text = line.rstrip().decode("utf-8", "replace")
        if text:
            log.error("worker {index} stderr: {line}", index=self.index, line=text)

    def outReceived(self, data: bytes) -> None:
        self._out.feed(data)

    def errReceived(self, data: bytes) -> None:
        self._err.feed(data)

    def signal(self, name: str) -> None:
        transport = self.transport
        if transport is not None:
            try:
                transport.signalProcess(name)
            except (ProcessExitedAlready, OSError):
                pass

    def processEnded(self, reason: Failure) -> None:
        self._out.flush()
        self._err.flush()
        self._on_ended(self, reason)
        self.ended.callback(None)


def exit_text(reason: Failure) -> str:
    """``status 1``, ``signal 9``, or ``status 0``."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig is not None:
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"status {getattr(value, 'exitCode', '?')}"


class Workers(service.Service):
    """N worker processes on the listener of ``address``; see the module docstring.

    ``command(index)`` is a worker's argv; ``spawn`` is the reactor's ``spawnProcess``
    (injected for tests).
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        address: ListenAddress,
        command: Command,
        env: Mapping[str, str],
        *,
        spawn: Spawn | None = None,
        restart_delay: float = RESTART_DELAY,
        max_restart_delay: float = MAX_RESTART_DELAY,
        stop_timeout: float = STOP_TIMEOUT,
        coordinator: Coordinator | None = None,
    ) -> None:
        self._reactor = reactor
        self._coordinator = coordinator
        self.count = count
        self.address = address
        self._command = command
        self._env = dict(env)
        self._spawn_process: Spawn = spawn or reactor.spawnProcess
        self._restart_delay = restart_delay
        self._max_restart_delay = max_restart_delay
        self._stop_timeout = stop_timeout
        self._sockets: list[socket.socket] = []
        self.processes: dict[int, WorkerProcess] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self.restarted = 0  # workers started again after they exited
        self._stopping = False
        self._previous_hup: Any = None

    # -- start ----------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        if not self._sockets:
            self._sockets = self.address.bind_all(self.count)

    def startService(self) -> None:
        super().startService()
        self._bind()
        self._stopping = False
        self._forward_hangup()
        if self._coordinator is None:
            self._start_all()
            return
        self._coordinator.startService()
        Deferred.fromCoroutine(self._coordinator.ready()).addCallback(self._coordinated)

    def _coordinated(self, ready: bool) -> None:
        if not ready:
            log.error(
                "coordinator: redis-server did not answer in time; the workers start "
                "on their own and join it when it answers"
            )
        self._start_all()

    def _start_all(self) -> None:
        for index in range(1, self.count + 1):
            self._start(index)
        log.info(
            "{count} workers on {listen} ({how})",
            count=self.count,
            listen=self.describe(),
            how="one socket each, SO_REUSEPORT" if self.address.reuse_port else "one shared socket",
        )

    def describe(self) -> str:
        if self.address.family == "unix":
            return self.address.host
        host, port = self._sockets[0].getsockname()[:2] if self._sockets else ("?", "?")
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def _start(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        process = WorkerProcess(index, self._ended)
        process.started_at = self._reactor.seconds()
        argv = list(self._command(index))
        env = dict(self._env)
        if self._coordinator is not None:
            env[COORDINATOR_ENV] = self._coordinator.url
        transport = self._spawn_process(
            process,
            argv[0],
            argv,
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", WORKER_FD: self._sockets[index - 1].fileno()},
        )
        process.pid = getattr(transport, "pid", None)
        self.processes[index] = process
        log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def _forward_hangup(self) -> None:
        if not hasattr(signal, "SIGHUP"):
            return
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_hangup)
        except ValueError:  # not the main thread (tests)
            self._previous_hup = None

    def _on_hangup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.signal_all, "HUP")

    def signal_all(self, name: str) -> None:
        for process in list(self.processes.values()):
            process.signal(name)

    # -- a worker ended ---------------------------------------------------------------

    def _ended(self, process: WorkerProcess, reason: Failure) -> None:
        if self.processes.get(process.index) is process:
            del self.processes[process.index]
        how = exit_text(reason)
        if self._stopping:
            log.info(
                "worker {index} (pid {pid}) stopped ({how})",
                index=process.index,
                pid=process.pid,
                how=how,
            )
            return
        ran = self._reactor.seconds() - process.started_at
        delay = self._restart_delay
        if ran < STABLE_AFTER and process.index in self._delays:
            delay = min(self._delays[process.index] * 2, self._max_restart_delay)
        self._delays[process.index] = delay
        log.error(
            "worker {index} (pid {pid}) exited ({how}) after {ran:.1f} s; "
            "starting it again in {delay:g} s",
            index=process.index,
            pid=process.pid,
            how=how,
            ran=ran,
            delay=delay,
        )
        self.restarted += 1
        self._restarts[process.index] = self._reactor.callLater(delay, self._start, process.index)

    # -- stop -----------------------------------------------------------------------

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopping = True
        if self._coordinator is not None:
            self._coordinator.stop_restarting()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        running = list(self.processes.values())
        for process in running:
            process.signal("TERM")
        kill = self._reactor.callLater(self._stop_timeout, self._kill, running)
        done: Deferred[Any] = DeferredList([p.ended for p in running])

        def stopped(result: object) -> object:
            if kill.active():
                kill.cancel()
            self._close()
            if self._coordinator is not None:
                return self._coordinator.stopService()
            return result

        return done.addBoth(stopped)

    def _kill(self, running: list[WorkerProcess]) -> None:
        for process in running:
            if not process.ended.called:
                log.error(
                    "worker {index} (pid {pid}) did not stop in {timeout:g} s: SIGKILL",
                    index=process.index,
                    pid=process.pid,
                    timeout=self._stop_timeout,
                )
                process.signal("KILL")

    def _close(self) -> None:
        for sock in {id(s): s for s in self._sockets}.values():
            sock.close()
        self._sockets = []
        if self.address.family == "unix":
            try:
                os.unlink(self.address.host)
            except OSError:
                pass


def worker_command(
    python: str, config_path: str | None, address: ListenAddress, extra: Sequence[str] = ()
) -> Command:
    """``python -m regmirror.app.worker ...`` for worker ``index``."""

    def command(index: int) -> list[str]:
        argv = [python, "-m", "regmirror.app.worker", "--index", str(index)]
        argv += ["--fd", str(WORKER_FD), "--family", address.family]
        if config_path is not None:
            argv += ["--config", config_path]
        return [*argv, *extra]

    return command
