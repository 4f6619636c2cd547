"""``regmirror.workers > 1``: what the parent runs, and what the start-up checks.

The workers need a coordinator (DESIGN.md invariant 8: one cache across processes):
``regmirror.cluster.redis`` when configured, else the parent's private
``redis-server`` (``regmirror.app.coordinator``); without either, start-up stops with
one line saying so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.application import service
from twisted.internet.defer import Deferred

import regmirror
from regmirror import logs
from regmirror.app.coordinator import PrivateRedis, find_redis_server
from regmirror.app.sockets import ListenAddress
from regmirror.app.workers import Workers, worker_command
from regmirror.config import Config, ConfigError, load_config, parse_config
from regmirror.coord.redis import Coordinator

log = logs.get_logger()

_PACKAGE_DIR = str(Path(regmirror.__file__).resolve().parents[1])


def worker_config(path: str | None, index: int, coordinator: str | None) -> Config:
    """Worker ``index``'s configuration, read from ``path``: the cluster's, else with the
    parent's private coordinator (its URL) as ``regmirror.cluster.redis``, so that the
    other ``regmirror.cluster`` keys (name, replica, lease) apply too. Its replica name
    is the cluster's with ``-wINDEX`` (``regmirror.app.cluster.replica_name``): stable
    across restarts, so a worker started again sweeps its predecessor's temporary
    files, nobody else's."""
    config, _warnings = load_config(path)  # the parent logged the warnings
    if config.cluster is not None:
        return config
    if not coordinator:
        raise ConfigError(f"{config.source}: worker {index}: no coordinator to use")
    data: Any = yaml.safe_load(Path(path).read_text()) if path is not None else None
    data = dict(data) if isinstance(data, dict) else {}
    node = data
    for key in ("regmirror", "cluster"):
        child = node.get(key)
        node[key] = dict(child) if isinstance(child, dict) else {}
        node = node[key]
    node["redis"] = coordinator
    return parse_config(data, config.source)[0]


JOIN_TIMEOUT = 5.0


def joined(coordinator: Coordinator, reactor: Any, timeout: float = JOIN_TIMEOUT) -> Deferred[bool]:
    """Fires with True once ``coordinator`` reached Redis, or with False after
    ``timeout`` seconds without it: a worker starts accepting then (a worker that
    accepted before it joined would fetch alone what another may be fetching)."""
    done: Deferred[bool] = Deferred()
    if coordinator.connected:
        done.callback(True)
        return done

    def fire(connected: bool) -> None:
        if connected and not done.called:
            call.cancel()
            done.callback(True)

    def give_up() -> None:
        if not done.called:
            log.warn(
                "worker: Redis not reached in {timeout:g} s: serving alone until it is",
                timeout=timeout,
            )
            done.callback(False)

    call = reactor.callLater(timeout, give_up)
    coordinator.on_change(fire)
    return done


def check_workers(config: Config) -> None:
    """Raise ``ConfigError`` (one line) if ``workers > 1`` cannot be started."""
    if config.workers <= 1 or config.cluster is not None:
        return
    if find_redis_server() is None:
        raise ConfigError(
            f"{config.source}: regmirror.workers: {config.workers} workers coordinate "
            "through Redis: set regmirror.cluster.redis, or install redis-server "
            "(Debian: apt-get install redis-server) for a private one"
        )


def worker_env() -> dict[str, str]:
    """The parent's environment (secrets by variable), regmirror importable first."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = _PACKAGE_DIR + (os.pathsep + path if path else "")
    return env


def workers_service(config: Config, reactor: Any, config_path: str | None) -> service.MultiService:
    """The parent's service tree: the supervisor of ``config.workers`` workers."""
    address = ListenAddress.parse(config.listen)
    coordinator = None
    if config.cluster is None:
        executable = find_redis_server()
        if executable is None:  # check_workers said so at start-up already
            raise ConfigError("regmirror.workers: redis-server not found")
        coordinator = PrivateRedis(reactor, executable, worker_env())
    top = service.MultiService()
    Workers(
        reactor,
        config.workers,
        address,
        worker_command(sys.executable, config_path, address),
        worker_env(),
        coordinator=coordinator,
    ).setServiceParent(top)
    log.info(
        "regmirror with {count} workers mirroring {upstreams} into {root}, listening on "
        "{listen}; coordinated by {how}",
        count=config.workers,
        upstreams=", ".join(u.url for u in config.upstreams),
        root=str(config.root.absolute()),
        listen=config.listen,
        how="regmirror.cluster.redis" if coordinator is None else "a private redis-server",
    )
    return top
