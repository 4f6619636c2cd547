"""Logging: one ``Logger`` per module, filtered by the configured level.

twistd owns the log observers (``--logfile``, ``--logger``); our loggers pass their events
through a level filter first, so ``log.level`` in the config applies to regmirror's own
events. ``twistd --logger regmirror.logs.json_observer`` writes JSON lines to stdout.
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def get_logger(namespace: str | None = None) -> Logger:
    """A module's logger; its events pass through the configured level filter."""
    if namespace is None:
        namespace = sys._getframe(1).f_globals.get("__name__", "regmirror")
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    # LogLevelFilterPredicate reads defaultLogLevel only when its table is cleared.
    _predicate.defaultLogLevel = LEVELS[level]
    _predicate.clearLogLevels()


def json_observer() -> ILogObserver:
    """For ``twistd --logger regmirror.logs.json_observer``: JSON lines on stdout."""
    return jsonFileLogObserver(sys.stdout)
