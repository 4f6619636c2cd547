"""What the fault suite watches in a running mirror: open fds, RSS, its /metrics.

``fd_count`` and ``rss_mb`` read ``/proc/PID``; ``metric`` reads one sample of the
mirror's Prometheus text (``regmirror_fetches_in_flight``...); ``admin_purge`` removes a blob as
``regmirror purge`` does.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
from pathlib import Path

from tests.support.rawhttp import request


def fd_count(pid: int, *, ignore_peer_port: int | None = None) -> int:
    """Open fds of ``pid``; with ``ignore_peer_port``, not counting TCP sockets connected
    to that port (the idle keep-alive connections of a pool to the upstream)."""
    names = fd_links(pid)
    if ignore_peer_port is None:
        return len(names)
    pooled = {f"socket:[{inode}]" for inode in _inodes_to(pid, ignore_peer_port)}
    return sum(1 for name in names if name not in pooled)


def _inodes_to(pid: int, port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    if remote_port == port:
                        inodes.add(fields[9])
        except FileNotFoundError:
            pass
    return inodes


def fd_links(pid: int) -> list[str]:
    """What each open fd of ``pid`` points at (for a failure message)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric(base_url: str, name: str, labels: str = "", default: float | None = None) -> float:
    """The value of ``name{labels}`` (``labels`` as in the exposition, e.g.
    ``upstream="x"``; empty: the sample without labels, or the sum of all samples).
    Without such a sample: ``default``, or an AssertionError if it is ``None``."""
    resp = request(base_url, "GET", "/metrics", timeout=10)
    if resp.status != 200:
        raise AssertionError(f"/metrics answered {resp.status}")
    total = 0.0
    found = False
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$")
    for line in resp.body.decode().splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        if labels and labels not in (match.group(1) or ""):
            continue
        total += float(match.group(2))
        found = True
    if not found:
        if default is not None:
            return default
        raise AssertionError(f"no sample {name}{{{labels}}} in /metrics")
    return total


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def admin_purge(store_root: Path, digest: str, timeout: float = 10.0) -> int:
    """``POST /purge {"digest": ...}`` on a running mirror's admin socket
    (``ROOT/_state/admin.sock``): what ``regmirror purge DIGEST`` does, without the
    start-up of a CLI process. Returns the status (200 purged, 404 nothing, 409 busy)."""
    conn = _UnixHTTPConnection(str(store_root / "_state" / "admin.sock"), timeout)
    try:
        body = json.dumps({"digest": digest}).encode()
        conn.request("POST", "/purge", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
