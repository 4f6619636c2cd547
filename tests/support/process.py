"""Child processes that tests start, watch and stop by PID (never by name)."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from tests.support.rawhttp import request, split_base_url
from tests.support.wait import poll_until


class ToolMissingError(RuntimeError):
    """A program the tests need is not installed: a failure, never a skip."""


def require_tool(name: str) -> str:
    """Return the absolute path of ``name`` on ``PATH`` or raise ``ToolMissingError``."""
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(
            f"{name!r} is not installed or not on PATH; the integration tests need it "
            f"(Debian: apt-get install {_DEBIAN_PACKAGES.get(name, name)})"
        )
    return path


_DEBIAN_PACKAGES = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "containerd": "containerd",
    "ctr": "containerd",
    "dockerd": "docker.io",
    "docker": "docker.io",
    "promtool": "prometheus",
    "systemd-analyze": "systemd",
}

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL the child if the test process dies without cleaning up."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One child process with its stdout and stderr sent to files.

    ``stop()`` sends SIGTERM to the child's PID, waits, then falls back to SIGKILL;
    ``kill9()`` sends SIGKILL at once. Both are idempotent. On Linux the child also gets
    SIGKILL if the thread that started it exits (``PR_SET_PDEATHSIG``), so start it from
    the thread that will stop it (pytest fixtures do).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdout_path: Path,
        stderr_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.name = name or Path(argv[0]).name
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended (negative: killed by signal)."""
        return self._popen.poll() if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.stdout_path.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        # Append: a restarted process keeps the earlier log in the same file.
        out: IO[bytes]
        err: IO[bytes]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.cwd,
                env=self.env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit status."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            try:
                os.kill(popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return self.kill9()
        return popen.returncode

    def kill9(self) -> int | None:
        """SIGKILL the child now and reap it. Returns the exit status."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            try:
                os.kill(popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            popen.wait(10.0)
        return popen.returncode


def wait_http_ready(
    process: ManagedProcess,
    url: str,
    timeout: float,
    *,
    log_path: Path,
    extra_logs: Sequence[Path] = (),
    expect_status: int = 200,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Poll ``GET url`` (with ``headers``; ``ssl_context`` for https) until it answers
    ``expect_status``.

    Fails at once, with the log tail, if the process exits; fails with the log tail at
    the deadline.
    """
    parts = url.split("/", 3)
    base, target = "/".join(parts[:3]), "/" + (parts[3] if len(parts) > 3 else "")
    split_base_url(base)

    def ready() -> str | None:
        if not process.running:
            return "exited"
        try:
            status = request(
                base, "GET", target, headers=headers, timeout=2.0, ssl_context=ssl_context
            ).status
        except OSError:
            return None
        return "ready" if status == expect_status else None

    def describe() -> str:
        return "\n".join(f"--- {p} (tail) ---\n{tail(p)}" for p in (log_path, *extra_logs))

    outcome = poll_until(
        ready,
        timeout,
        what=f"{process.name} (pid {process.pid}) to answer GET {url} with {expect_status}",
        describe=describe,
    )
    if outcome == "exited":
        raise RuntimeError(
            f"{process.name} (pid {process.pid}) exited with status {process.returncode} "
            f"during start-up\n{describe()}"
        )


def descendants(pid: int) -> list[int]:
    """``pid``'s children, their children and so on (from ``/proc``, Linux), not
    ``pid`` itself."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []
