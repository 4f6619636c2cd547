"""``regmirror.workers``: the parent's parts without processes (a fake spawn, a Clock),
the listening sockets on loopback, the log relay, and the configuration."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, eventAsJSON, globalLogPublisher
from twisted.python.failure import Failure

from regmirror.app import processes
from regmirror.app.sockets import ListenAddress
from regmirror.app.workers import (
    COORDINATOR_ENV,
    WORKER_FD,
    WorkerProcess,
    Workers,
    exit_text,
    relay_line,
    worker_command,
)
from regmirror.config import ConfigError, listen_endpoint, parse_config


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeSpawn:
    """Records what the supervisor spawns; each process gets a new pid."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.next_pid = 100

    def __call__(self, protocol: WorkerProcess, executable: str, argv: list[str], **kw: Any) -> Any:
        self.next_pid += 1
        transport = FakeTransport(self.next_pid)
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        self.calls.append({"protocol": protocol, "argv": argv, **kw})
        return transport


class FakeCoordinator:
    url = "redis://:secret@127.0.0.1:1/0"

    def __init__(self) -> None:
        self.events: list[str] = []

    def startService(self) -> None:
        self.events.append("start")

    def stopService(self) -> Any:
        from twisted.internet.defer import succeed

        self.events.append("stop")
        return succeed(None)

    async def ready(self) -> bool:
        self.events.append("ready")
        return True

    def stop_restarting(self) -> None:
        self.events.append("stop_restarting")


def killed(sig: int = 9) -> Failure:
    return Failure(ProcessTerminated(signal=sig))


def supervisor(
    clock: Clock, spawn: FakeSpawn, count: int = 2, **kw: Any
) -> tuple[Workers, ListenAddress]:
    address = ListenAddress("inet", "127.0.0.1", 0)
    workers = Workers(
        clock,
        count,
        address,
        worker_command("/usr/bin/python3", "/etc/regmirror.yml", address),
        {"A": "1"},
        spawn=spawn,
        **kw,
    )
    return workers, address


# --- the listener ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "net", "expected"),
    [
        (":5000", "tcp", ListenAddress("inet", "", 5000)),
        ("127.0.0.1:5000", "tcp", ListenAddress("inet", "127.0.0.1", 5000)),
        ("[::1]:5000", "tcp", ListenAddress("inet6", "::1", 5000)),
        ("/run/regmirror/sock:et", "unix", ListenAddress("unix", "/run/regmirror/sock:et")),
    ],
)
def test_listen_address_reads_what_the_config_writes(
    addr: str, net: str, expected: ListenAddress
) -> None:
    assert ListenAddress.parse(listen_endpoint(addr, net)) == expected


def test_tcp_workers_get_a_socket_each_on_one_port() -> None:
    sockets = ListenAddress("inet", "127.0.0.1", 0).bind_all(3)
    try:
        assert len({id(s) for s in sockets}) == 3
        assert len({s.getsockname() for s in sockets}) == 1
        for s in sockets:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert s.get_inheritable()
    finally:
        for s in sockets:
            s.close()


def test_unix_socket_workers_share_one_and_an_existing_file_is_not_removed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "regmirror.sock"
    sockets = ListenAddress("unix", str(path)).bind_all(2)
    try:
        assert sockets[0] is sockets[1]
        with pytest.raises(OSError):  # in use, as with one process
            ListenAddress("unix", str(path)).bind()
    finally:
        sockets[0].close()


# --- the log relay ---------------------------------------------------------------------


def test_a_worker_event_is_logged_by_the_parent_with_its_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        event = {
            "log_format": "blob {digest} from {source}",
            "digest": "sha256:ab",
            "source": "upstream",
            "log_level": LogLevel.warn,
            "log_namespace": "regmirror.fetch",
            "log_time": 1.0,
        }
        relay_line(2, b"\x1e" + eventAsJSON(event).encode() + b"\n")
        relay_line(1, b"not json\n")
    finally:
        globalLogPublisher.removeObserver(seen.append)
    relayed = [e for e in seen if e.get("log_system", "").startswith("w2/")]
    assert len(relayed) == 1
    assert relayed[0]["log_system"] == "w2/regmirror.fetch#warn"
    assert relayed[0]["digest"] == "sha256:ab" and relayed[0]["log_time"] == 1.0
    text = [e for e in seen if e.get("line") == "not json"]
    assert text and text[0]["index"] == 1


def test_output_split_across_reads_is_relayed_line_by_line() -> None:
    lines: list[bytes] = []
    process = WorkerProcess(1, lambda p, r: None)
    process._out._emit = lines.append  # the relay, observed
    process.outReceived(b'{"a": 1}\n{"b"')
    process.outReceived(b": 2}\n")
    assert [json.loads(x) for x in lines] == [{"a": 1}, {"b": 2}]


# --- the supervisor --------------------------------------------------------------------


def test_workers_are_started_with_the_socket_as_descriptor_3_and_the_environment() -> None:
    clock, spawn = Clock(), FakeSpawn()
    workers, _ = supervisor(clock, spawn)
    workers.startService()
    try:
        assert [c["argv"][4] for c in spawn.calls] == ["1", "2"]
        first = spawn.calls[0]
        assert first["argv"][:3] == ["/usr/bin/python3", "-m", "regmirror.app.worker"]
        assert first["argv"][-2:] == ["--config", "/etc/regmirror.yml"]
        assert set(first["childFDs"]) == {0, 1, 2, WORKER_FD}
        assert first["childFDs"][0] == "w"  # its stdin: end of file when the parent dies
        assert first["env"] == {"A": "1"}
        fds = {c["childFDs"][WORKER_FD] for c in spawn.calls}
        assert len(fds) == 2  # SO_REUSEPORT: a socket each
    finally:
        workers.stopService()
        for call in spawn.calls:
            call["protocol"].processEnded(killed(15))


def test_a_worker_that_exits_is_started_again_with_a_growing_delay() -> None:
    clock, spawn = Clock(), FakeSpawn()
    workers, _ = supervisor(clock, spawn, count=1)
    workers.startService()
    delays = []
    for _ in range(4):
        process = spawn.calls[-1]["protocol"]
        started = len(spawn.calls)
        process.processEnded(killed())
        assert workers.processes == {}
        waited = 0.0
        while len(spawn.calls) == started:
            clock.advance(0.5)
            waited += 0.5
        delays.append(waited)
    assert delays == [1.0, 2.0, 4.0, 5.0]
    assert workers.restarted == 4
    # One that ran long enough is started again after the short delay.
    clock.advance(60)
    spawn.calls[-1]["protocol"].processEnded(Failure(ProcessDone(0)))
    clock.advance(1.0)
    assert len(spawn.calls) == 6
    workers.stopService()
    spawn.calls[-1]["protocol"].processEnded(killed(15))


def test_stopping_sends_sigterm_waits_for_every_worker_then_sigkill() -> None:
    clock, spawn = Clock(), FakeSpawn()
    workers, _ = supervisor(clock, spawn, stop_timeout=15.0)
    workers.startService()
    first, second = (c["protocol"] for c in spawn.calls)
    done = workers.stopService()
    assert [first.transport.signals, second.transport.signals] == [["TERM"], ["TERM"]]
    first.processEnded(killed(15))
    assert not done.called
    clock.advance(15.0)
    assert second.transport.signals == ["TERM", "KILL"]
    assert first.transport.signals == ["TERM"]
    second.processEnded(killed(9))
    assert done.called
    assert len(spawn.calls) == 2  # nothing started again while stopping
    clock.advance(10)
    assert len(spawn.calls) == 2 and not clock.getDelayedCalls()


def test_a_private_coordinator_starts_first_and_stops_last() -> None:
    clock, spawn = Clock(), FakeSpawn()
    coordinator = FakeCoordinator()
    workers, _ = supervisor(clock, spawn, coordinator=coordinator)
    workers.startService()
    assert coordinator.events == ["start", "ready"]
    assert all(c["env"][COORDINATOR_ENV] == coordinator.url for c in spawn.calls)
    done = workers.stopService()
    assert coordinator.events[-1] == "stop_restarting"
    for call in spawn.calls:
        call["protocol"].processEnded(killed(15))
    assert done.called and coordinator.events[-1] == "stop"


def test_sighup_is_passed_on_to_every_worker() -> None:
    clock, spawn = Clock(), FakeSpawn()
    workers, _ = supervisor(clock, spawn)
    workers.startService()
    workers.signal_all("HUP")
    assert [c["protocol"].transport.signals for c in spawn.calls] == [["HUP"], ["HUP"]]
    workers.stopService()
    for call in spawn.calls:
        call["protocol"].processEnded(killed(15))


def test_exit_text_names_the_signal_or_status() -> None:
    assert exit_text(killed(9)) == "signal SIGKILL"
    assert exit_text(Failure(ProcessTerminated(exitCode=3))) == "status 3"


# --- configuration ---------------------------------------------------------------------


def test_workers_default_to_one_and_must_be_positive() -> None:
    assert parse_config({})[0].workers == 1
    assert parse_config({"regmirror": {"workers": 4}})[0].workers == 4
    for bad in (0, -1, True, "2"):
        with pytest.raises(ConfigError, match=r"regmirror\.workers"):
            parse_config({"regmirror": {"workers": bad}})


def test_workers_without_redis_server_or_a_cluster_is_one_line_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = parse_config({"regmirror": {"workers": 2}})[0]
    monkeypatch.setattr(processes, "find_redis_server", lambda: None)
    with pytest.raises(ConfigError) as info:
        processes.check_workers(config)
    message = str(info.value)
    assert "\n" not in message
    assert "regmirror.cluster.redis" in message and "redis-server" in message
    clustered = parse_config(
        {"regmirror": {"workers": 2, "cluster": {"redis": "redis://127.0.0.1:6379/0"}}}
    )[0]
    processes.check_workers(clustered)  # a cluster needs no private coordinator
    processes.check_workers(parse_config({})[0])


def test_a_worker_uses_the_cluster_or_else_the_private_coordinator(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yml"
    plain.write_text("regmirror:\n  workers: 2\n  cluster:\n    name: edge\n    lease: 5s\n")
    config = processes.worker_config(str(plain), 1, "redis://:pw@127.0.0.1:4242/0")
    assert config.cluster is not None
    assert (config.cluster.redis.port, config.cluster.redis.password) == (4242, "pw")
    assert (config.cluster.name, config.cluster.lease) == ("edge", 5.0)  # still apply
    clustered = tmp_path / "clustered.yml"
    clustered.write_text(
        "regmirror:\n  workers: 2\n  cluster:\n    redis: redis://127.0.0.1:6380/0\n"
    )
    config = processes.worker_config(str(clustered), 1, "redis://:pw@127.0.0.1:4242/0")
    assert config.cluster is not None and config.cluster.redis.port == 6380
    with pytest.raises(ConfigError):
        processes.worker_config(str(plain), 1, None)


# --- a worker accepts once it joined its coordinator ----------------------------------


class FakeRedis:
    def __init__(self, connected: bool = False) -> None:
        self.connected = connected
        self.listeners: list[Any] = []

    def on_change(self, listener: Any) -> None:
        self.listeners.append(listener)

    def set(self, connected: bool) -> None:
        self.connected = connected
        for listener in self.listeners:
            listener(connected)


def test_joined_fires_when_redis_is_reached_or_after_the_timeout() -> None:
    clock = Clock()
    assert processes.joined(FakeRedis(connected=True), clock).result is True  # type: ignore[arg-type]
    redis = FakeRedis()
    waiting = processes.joined(redis, clock, timeout=5.0)  # type: ignore[arg-type]
    clock.advance(1.0)
    assert not waiting.called
    redis.set(True)
    assert waiting.result is True and not clock.getDelayedCalls()
    alone = processes.joined(FakeRedis(), clock, timeout=5.0)  # type: ignore[arg-type]
    clock.advance(5.0)
    assert alone.result is False


def test_a_worker_adopts_its_socket_only_once_ready() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.testing import MemoryReactor

    from regmirror.app.listeners import AdoptedPort
    from regmirror.app.sockets import Inherited

    reactor = MemoryReactor()
    sock = ListenAddress("inet", "127.0.0.1", 0).bind()
    try:
        ready: Deferred[bool] = Deferred()
        port = AdoptedPort(reactor, Inherited(sock.fileno(), "inet", 1), object(), lambda: ready)
        port.startService()
        assert reactor.adoptedPorts == []
        ready.callback(True)
        assert [(fd, family) for fd, family, _ in reactor.adoptedPorts] == [
            (sock.fileno(), socket.AF_INET)
        ]
        assert not os.get_blocking(sock.fileno())  # for Twisted's accept loop
    finally:
        sock.close()
