"""One worker of ``regmirror.workers``: ``python -m regmirror.app.worker``.

Started by the parent (``regmirror.app.workers``), never by hand: it reads the same
configuration file, serves on the listening socket it inherited as descriptor 3, and
is a full mirror that coordinates with the other workers as a replica of a cluster
does (through ``regmirror.cluster.redis``, or the parent's private coordinator, whose
URL it finds in its environment); it starts accepting once it has reached Redis (at
most 5 s: ``regmirror.app.processes.joined``). Its log events go to stdout as JSON
lines, which the parent puts in twistd's log. It stops on SIGTERM (like twistd: the
services stop, the transfers in progress are cut) and when its stdin reaches end of
file (the parent is gone).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from twisted.logger import globalLogBeginner, jsonFileLogObserver

from regmirror import logs
from regmirror.app.sockets import Inherited
from regmirror.app.workers import COORDINATOR_ENV
from regmirror.config import ConfigError

log = logs.get_logger()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="regmirror-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--family", choices=("inet", "inet6", "unix"), required=True)
    parser.add_argument("--config")
    return parser.parse_args(list(argv))


def watch_parent(reactor: Any) -> None:
    """Stop when stdin (a pipe from the parent) reaches end of file."""

    def wait() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        reactor.callFromThread(_stop, reactor)

    threading.Thread(target=wait, name="regmirror-parent", daemon=True).start()


def _stop(reactor: Any) -> None:
    if reactor.running:
        log.warn("the parent process is gone: stopping")
        reactor.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Signals from a terminal (Ctrl-C) go to the parent, which stops the workers in order.
    os.setpgid(0, 0)
    # The parent passes SIGHUP on: it reloads TLS files and htpasswd where configured
    # (``ReloadOnHangup`` installs its handler), and must not end a worker elsewhere.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    out = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(out)], redirectStandardIO=False)
    try:
        from regmirror.app.listeners import check_files
        from regmirror.app.processes import worker_config
        from regmirror.app.service import build

        config = worker_config(args.config, args.index, os.environ.get(COORDINATOR_ENV))
        tls = check_files(config)
    except ConfigError as e:
        sys.stderr.write(f"regmirror worker {args.index}: {e}\n")
        return 2
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    inherited = Inherited(args.fd, args.family, args.index)
    top = build(config, reactor, tls, inherited=inherited, worker=args.index)
    watch_parent(reactor)
    top.privilegedStartService()
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    log.info("worker {index} (pid {pid}) serving", index=args.index, pid=os.getpid())
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
