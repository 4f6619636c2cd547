"""A private Docker daemon (Debian's ``docker.io``, dockerd 20.10) and its ``docker``
client, for pulls through the mirror configured as operators configure Docker:
``--registry-mirror=URL``. Docker only mirrors Docker Hub: ``docker pull alpine:3.19``
asks the mirror for ``/v2/library/alpine/manifests/3.19``; when the mirror fails it
falls back to ``registry-1.docker.io``, which cannot be reached from the test machine,
so a pull that works came through the mirror (``fell_back_to_docker_hub()`` says
whether it tried).

Everything the daemon writes lives under a short directory in /tmp (unix socket paths
must stay under 108 bytes): data root, exec root, pidfile, socket, the client's config
dir, the daemon's log, and ``daemon.json``, which replaces ``/etc/docker/daemon.json``
and only moves the daemon's identity key (``deprecated-key-path``) out of
``/etc/docker``. The daemon talks to a containerd of its own (``Containerd``, started
first, stopped last) rather than one it would find at /run/containerd: nothing is
shared with the machine but an empty /run/docker/plugins, which dockerd always creates
(removed again if it was not there before). ``stop()`` stops the daemon by PID, checks
that no process it started is left, unmounts what is still mounted under the directory
(dockerd bind-mounts its data root) and removes the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.support.containerd import Containerd
from tests.support.process import ManagedProcess, require_tool, tail
from tests.support.wait import PollTimeoutError, poll_until

# dockerd always creates this (plugin sockets), whatever its exec root: removed again
# by ``stop()`` when it did not exist before and is still empty.
_PLUGINS_DIR = Path("/run/docker/plugins")

# What dockerd logs (at info) when an endpoint failed and it tries the next one: for a
# Docker Hub name, after the mirror comes https://registry-1.docker.io.
_FALLBACK = "Attempting next endpoint for pull"


class Dockerd:
    """One dockerd with ``--registry-mirror=mirror_url``; ``start()`` blocks until its
    API answers ``/_ping``."""

    def __init__(self, mirror_url: str, *, log_level: str = "debug") -> None:
        self.dockerd = require_tool("dockerd")
        self.docker = require_tool("docker")
        self.umount = require_tool("umount")
        self.containerd = Containerd()
        self.mirror_url = mirror_url
        self.base = Path(tempfile.mkdtemp(prefix="dkd", dir="/tmp"))
        self.socket = self.base / "d.sock"
        self.data_root = self.base / "root"
        self.exec_root = self.base / "x"
        self.log_path = self.base / "dockerd.log"
        self.config_file = self.base / "daemon.json"
        self.config_file.write_text(
            json.dumps({"deprecated-key-path": str(self.base / "key.json")}) + "\n"
        )
        self._created_run_docker = False
        # The client reads $DOCKER_CONFIG (not ~/.docker) and no DOCKER_HOST/CONTEXT.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        self.client_env = {**clean, "DOCKER_CONFIG": str(self.base / "cfg")}
        self._process = ManagedProcess(
            [
                self.dockerd,
                f"--config-file={self.config_file}",
                f"--data-root={self.data_root}",
                f"--exec-root={self.exec_root}",
                f"--pidfile={self.base / 'd.pid'}",
                f"--host=unix://{self.socket}",
                f"--containerd={self.containerd.socket}",
                f"--log-level={log_level}",
                f"--registry-mirror={mirror_url}",
                "--storage-driver=vfs",
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--userland-proxy=false",
            ],
            stdout_path=self.base / "dockerd.out",
            stderr_path=self.log_path,
            env={k: v for k, v in clean.items() if not k.lower().endswith("_proxy")},
            name="dockerd",
        )

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        try:
            self.containerd.start()
            self._created_run_docker = not _PLUGINS_DIR.parent.exists()
            self._process.start()
            outcome = poll_until(
                self._ping,
                30,
                what=f"dockerd (pid {self._process.pid}) to answer GET /_ping on {self.socket}",
                describe=self.log_tail,
            )
            if outcome == "exited":
                raise RuntimeError(
                    f"dockerd exited with status {self._process.returncode} during start-up\n"
                    + self.log_tail()
                )
        except BaseException:
            self.stop()
            raise

    def _ping(self) -> str | None:
        if not self._process.running:
            return "exited"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(str(self.socket))
                sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
        except OSError:
            return None
        return "ready" if answer.startswith(b"HTTP/1.") and answer.endswith(b"OK") else None

    def stop(self) -> None:
        """Stop dockerd by PID, then its containerd; unmount, remove the directory.

        Raises ``AssertionError`` (after cleaning up) if a process dockerd started was
        still running 10 s after dockerd had exited; those are killed by PID."""
        left: list[int] = []
        try:
            children = self._descendants()
            self._process.stop(timeout=30)
            left = _wait_gone(children, 10)
        finally:
            self.containerd.stop()
            self._unmount_all()
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.base)], check=False)
            if self._created_run_docker:
                for directory in (_PLUGINS_DIR, _PLUGINS_DIR.parent):
                    with contextlib.suppress(OSError):  # not empty: someone else's
                        directory.rmdir()
        if left:
            raise AssertionError(f"dockerd left processes behind (killed): {left}")

    def _descendants(self) -> list[int]:
        """PIDs of the processes under dockerd right now (children, their children...)."""
        pid = self._process.pid
        if pid is None or not self._process.running:
            return []
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                # pid (comm) state ppid ...: comm may hold spaces and parentheses.
                parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
        found: list[int] = []
        frontier = [pid]
        while frontier:
            parent = frontier.pop()
            kids = [child for child, ppid in parents.items() if ppid == parent]
            found += kids
            frontier += kids
        return found

    def mounts(self) -> list[str]:
        """Mount points under the base directory, deepest first (``/proc/self/mountinfo``)."""
        base = str(self.base)
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base + "/"):
                points.append(point)
        return sorted(points, key=lambda p: p.count("/"), reverse=True)

    def _unmount_all(self) -> None:
        for point in self.mounts():
            subprocess.run([self.umount, "-l", point], capture_output=True, check=False)
        left = self.mounts()
        if left:
            raise AssertionError(f"could not unmount {left}; {self.base} is left in place")

    # --- client -------------------------------------------------------------------

    def docker_cli(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.docker, "--host", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.client_env,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n"
                f"{done.stderr}\n{self.log_tail()}"
            )
        return done

    def pull(self, ref: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker pull ref`` (a Docker Hub reference: ``alpine:3.19``, ``team/app:1``)."""
        return self.docker_cli("pull", ref, check=check)

    def inspect(self, ref: str) -> dict[str, object]:
        """``docker image inspect ref``: the image's JSON document."""
        doc = json.loads(self.docker_cli("image", "inspect", ref).stdout)
        assert isinstance(doc, list) and len(doc) == 1, doc
        image: dict[str, object] = doc[0]
        return image

    def repo_digests(self, ref: str) -> list[str]:
        """``RepoDigests`` of a pulled image: ``["alpine@sha256:..."]``."""
        digests = self.inspect(ref)["RepoDigests"]
        assert isinstance(digests, list)
        return [str(d) for d in digests]

    def image_id(self, ref: str) -> str:
        """The image ID: the digest of its config blob."""
        return str(self.inspect(ref)["Id"])

    # --- logs ---------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return (
            f"--- {self.log_path} (tail) ---\n{tail(self.log_path, lines)}\n"
            f"--- {self.containerd.base / 'containerd.log'} (tail) ---\n"
            f"{tail(self.containerd.base / 'containerd.log', 8)}"
        )

    def fell_back_to_docker_hub(self) -> bool:
        """Whether a pull found the mirror failing and tried the next endpoint."""
        return _FALLBACK in self.log_text()


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; SIGKILL (by PID) and return those still running
    at the deadline."""
    try:
        poll_until(lambda: not any(_alive(p) for p in pids), timeout, what="processes to end")
    except PollTimeoutError:
        left = [p for p in pids if _alive(p)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left
    return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
