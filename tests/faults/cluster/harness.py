"""What the cluster's fault tests share: replicas (real twistd, some in a network
namespace of the test's own), one real redis-server, the real upstream behind a
counting proxy, and the checker that verifies what every client got.

The checker is the Jepsen-style part: clients record each transfer; ``Checker.check``
compares every byte a client received (complete or cut) with the blob it asked for, so
an unverified byte served anywhere counts, not only wrong complete bodies; ``lost``
hashes the store's copy of every blob that a client got whole (a verified blob that
vanished, or whose file no longer hashes to its name, is lost).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.integration.test_blobs import Transfer, get_streaming
from tests.support.images import Blob
from tests.support.mirror import TWISTD_MAIN, Mirror
from tests.support.netns import Link, NetNs
from tests.support.ports import free_port
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import request
from tests.support.redis import RedisServer

MiB = 1024 * 1024
FreshBlob = Callable[[int], tuple[str, Blob]]


class FaultMirror(Mirror):
    """A replica, optionally inside a network namespace (``ns``), optionally started
    with a Python ``preamble`` run before twistd (a test-only hook, e.g. the fencing
    check taken out of the reaper's claim script to prove a test fails without it)."""

    def __init__(self, *args: Any, ns: NetNs | None = None, preamble: str = "", **kw: Any):
        super().__init__(*args, **kw)
        self.ns = ns
        self.preamble = preamble

    def start(self) -> None:
        if self._process is None:  # first start: a port free now (built long before)
            self.port = free_port()
        super().start()

    def argv(self) -> list[str]:
        argv = super().argv()
        if self.preamble:
            argv[2] = self.preamble + "; " + TWISTD_MAIN
        return self.ns.argv(argv) if self.ns is not None else argv


class NsRedis(RedisServer):
    """The test's redis-server, also listening on the root end of veth links."""

    def __init__(self, base_dir: Path, extra_binds: list[str]) -> None:
        super().__init__(base_dir)
        self.extra_binds = extra_binds

    def argv(self) -> list[str]:
        argv = super().argv()
        at = argv.index("--bind") + 2
        argv = argv[:at] + self.extra_binds + argv[at:]
        if self.extra_binds:  # reached over the test's own private veth links only
            argv[argv.index("--protected-mode") + 1] = "no"
        return argv


# -- what the clients got ---------------------------------------------------------------


@dataclass
class Checker:
    """Every transfer of the run, checked against the blob it was for."""

    transfers: list[tuple[Blob, Transfer]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # the replica each transfer was from
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, base_url: str, name: str, blob: Blob) -> Transfer:
        t = get_streaming(base_url, f"/v2/{name}/blobs/{blob.digest}")
        with self.lock:
            self.transfers.append((blob, t))
            self.urls.append(base_url)
        return t

    def of(self, base_url: str, blob: Blob) -> list[Transfer]:
        """The transfers of ``blob`` from one replica."""
        with self.lock:
            return [
                t
                for (b, t), u in zip(self.transfers, self.urls, strict=True)
                if b is blob and u == base_url
            ]

    def job(self, base_url: str, name: str, blob: Blob) -> Callable[[], Transfer]:
        """``get`` for a thread of ``run_parallel`` / ``background``."""
        return functools.partial(self.get, base_url, name, blob)

    @property
    def requests(self) -> int:
        return len(self.transfers)

    def verified(self) -> list[tuple[Blob, Transfer]]:
        return [
            (b, t)
            for b, t in self.transfers
            if t.complete and t.status == 200 and (t.size, t.sha256) == (b.size, b.digest)
        ]

    def unverified_bytes(self) -> int:
        """Bytes that clients received and that are not the blob's: a complete 200 of the
        wrong content, or a cut transfer whose bytes so far differ from the blob's."""
        bad = 0
        for blob, t in self.transfers:
            if t.status != 200 or t.size == 0:
                continue
            if t.size > blob.size:
                bad += t.size
            elif t.sha256 != "sha256:" + hashlib.sha256(blob.data[: t.size]).hexdigest():
                bad += t.size
            elif t.complete and t.size != blob.size:
                bad += t.size  # a short body presented as complete
        return bad

    def cut(self) -> int:
        return sum(1 for _, t in self.transfers if not t.complete)

    def describe(self) -> str:
        """The transfers that did not end with the whole blob, for a failure message."""
        return "\n".join(
            f"{u} {b.digest[:19]} size {b.size}: status {t.status}, {t.size} bytes, {t.error!r}"
            for (b, t), u in zip(self.transfers, self.urls, strict=True)
            if not (t.complete and t.status == 200 and t.size == b.size)
        )

    def failed_statuses(self) -> dict[int | None, int]:
        out: dict[int | None, int] = {}
        for _, t in self.transfers:
            if t.complete and t.status != 200:
                out[t.status] = out.get(t.status, 0) + 1
        return out

    def served_blobs(self) -> list[Blob]:
        seen: dict[str, Blob] = {}
        for b, _ in self.verified():
            seen[b.digest] = b
        return list(seen.values())


def run_parallel(jobs: Sequence[Callable[[], object]], timeout: float = 180) -> None:
    """Run each job in its own thread, released together; re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        try:
            barrier.wait(30)
            job()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "clients still running"
    if errors:
        raise errors[0]


@contextmanager
def background(jobs: Sequence[Callable[[], object]]) -> Iterator[list[threading.Thread]]:
    """Start jobs in threads; join them (at most 180 s) when the block ends."""
    errors: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,), daemon=True) for j in jobs]
    for t in threads:
        t.start()
    try:
        yield threads
    finally:
        for t in threads:
            t.join(180)
    assert not any(t.is_alive() for t in threads), "clients still running"
    if errors:
        raise errors[0]


# -- the replicas -------------------------------------------------------------------------


class Cluster:
    """Replicas over one shared store and one Redis, and the upstream proxy they count
    their fetches through."""

    def __init__(
        self,
        mirrors: list[FaultMirror],
        root: Path,
        redis: RedisServer,
        upstream: CountingProxy,
        redis_links: dict[int, Link],
    ) -> None:
        self.mirrors = mirrors
        self.root = root
        self.redis = redis
        self.upstream = upstream
        self.redis_links = redis_links  # replica index -> its own link to Redis
        self.prefix = "regmirror"
        self.stopped: set[int] = set()  # stopped on purpose (not a crash)
        self._fds: dict[int, int] = {}
        self._rss: dict[int, float] = {}

    def __getitem__(self, i: int) -> FaultMirror:
        return self.mirrors[i]

    def __len__(self) -> int:
        return len(self.mirrors)

    def url(self, i: int) -> str:
        return self.mirrors[i].url

    # store
    def blob_path(self, digest: str) -> Path:
        algorithm, _, hex_ = digest.partition(":")
        return self.root / "blobs" / algorithm / hex_[:2] / hex_

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def stored_digest(self, digest: str) -> str | None:
        try:
            with open(self.blob_path(digest), "rb") as f:
                return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            return None

    def lost_bytes(self, blobs: Iterable[Blob]) -> int:
        """Bytes of verified blobs (served whole) that the store no longer has right."""
        return sum(b.size for b in blobs if self.stored_digest(b.digest) != b.digest)

    def tmp_files(self) -> list[Path]:
        base = self.root / "_tmp"
        return sorted(p for p in base.rglob("*") if p.is_file()) if base.exists() else []

    # metrics
    def metric(self, i: int, name: str) -> float:
        text = request(self.url(i), "GET", "/metrics", timeout=5).body.decode()
        labels = "" if "{" in name else r"(?:\{[^}]*\})?"
        found = re.findall(rf"^{re.escape(name)}{labels} (\S+)$", text, re.M)
        return sum(float(v) for v in found)

    def connected(self, i: int) -> bool:
        return self.metric(i, "regmirror_cluster_connected") == 1

    def all_connected(self) -> bool:
        return all(self.connected(i) for i in range(len(self)) if i not in self.stopped)

    def leader(self) -> int | None:
        held = self.redis.client().call("GET", f"{self.prefix}:reaper")
        if held is None:
            return None
        return int(held.split(" ")[0][1:])

    def upstream_gets(self, blob: Blob) -> int:
        return self.upstream.count_requests("GET", f"/blobs/{blob.digest}")

    def duplicate_fetches(self, blobs: Iterable[Blob]) -> int:
        return sum(max(0, self.upstream_gets(b) - 1) for b in {b.digest: b for b in blobs}.values())

    # processes
    def pause(self, i: int) -> None:
        """SIGSTOP replica ``i`` (every thread of it: its reactor, its disk threads)."""
        pid = self.mirrors[i].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        pid = self.mirrors[i].pid
        assert pid is not None
        os.kill(pid, signal.SIGCONT)

    def crashes(self) -> int:
        return sum(1 for i, m in enumerate(self.mirrors) if i not in self.stopped and not m.running)

    def baseline(self) -> None:
        for i, m in enumerate(self.mirrors):
            if m.pid is not None:
                self._fds[i], self._rss[i] = _fds(m.pid), _rss_mb(m.pid)

    def fd_drift(self) -> int:
        return sum(
            _fds(m.pid) - self._fds[i]
            for i, m in enumerate(self.mirrors)
            if i in self._fds and m.pid is not None and m.running
        )

    def rss_drift_mb(self) -> float:
        return round(
            sum(
                _rss_mb(m.pid) - self._rss[i]
                for i, m in enumerate(self.mirrors)
                if i in self._rss and m.pid is not None and m.running
            ),
            1,
        )

    def logs(self) -> str:
        return "".join(m.log_text() for m in self.mirrors)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def elapsed(since: float, seconds: float) -> Callable[[], bool]:
    """True once ``seconds`` have passed since ``since`` (``time.monotonic()``): for
    poll_until when what is awaited is time itself (a pause longer than a lease)."""
    return lambda: time.monotonic() - since >= seconds
