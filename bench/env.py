"""The benchmark's loopback world, started and stopped by PID.

::

    skopeo/curl/wrk/ab ─> distribution (proxy mode) ─> CountedUpstream "dist"  ─┐
    skopeo/curl/wrk/ab ─> nginx proxy_cache         ─> CountedUpstream "nginx" ─┤ one
    skopeo/curl/wrk/ab ─> regmirror                 ─> CountedUpstream "rm"    ─┤ storage
    skopeo/curl        ─────────────────────────────> upstream (direct)        ─┤ directory
    curl               ─────────────────────────────> SpliceProxy ─> upstream  ─┤
    curl               ───────────────────────────> CountingProxy ─> upstream  ─┘

Each side reaches the upstream's content through a registry of its own
(``tests.support.countedupstream.CountedUpstream``: a docker-registry serving the
upstream's storage read-only on its own port), counted from that registry's log: no
proxy in the path, and every upstream byte and request attributable to one side; so
do the servers scenarios start themselves (4, 5, 7, 8: ``fresh_path``). Where a cap is
wanted (the capped run of scenario 5), the path is a counting proxy instead
(``tests.support.proxy.SpliceProxy``, splice(2), capped with a token bucket). The
direct path, to the upstream itself, is the ceiling; through a SpliceProxy and through
the asyncio CountingProxy (every side's path before) it shows what a proxy costs.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.certs import CA
from tests.support.countedupstream import CountedUpstream
from tests.support.images import Blob, Image, RegistryPusher, sha256_digest
from tests.support.merge import deep_merge
from tests.support.mirror import Mirror
from tests.support.nginx import NginxCache
from tests.support.process import descendants
from tests.support.proxy import CountingProxy, SpliceProxy
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

MiB = 1024 * 1024
BLOB_REPO = "bench/blobs"
_DOORS = itertools.count(1)  # numbers the doors of servers that scenarios start


def random_blob(seed: str, size: int, chunk: int = 32 * MiB) -> Blob:
    """``size`` deterministic random bytes, generated in chunks: ``randbytes`` cannot
    produce 256 MiB or more in one call (it overflows a C int of bits)."""
    import random

    rng = random.Random(seed)
    parts = []
    left = size
    while left:
        n = min(chunk, left)
        parts.append(rng.randbytes(n))
        left -= n
    data = b"".join(parts)
    return Blob(sha256_digest(data), "application/octet-stream", data, seed)


Server = UpstreamRegistry | Mirror | NginxCache
# How a side reaches the upstream, and what counts its traffic.
UpstreamPath = CountedUpstream | SpliceProxy
NGINX_WORKERS = 2  # worker_processes of the main nginx (scenario 4 also runs 1)


@dataclass
class Side:
    """One system under test: its server and the counted path it reaches upstream by."""

    key: str  # "dist", "nginx" or "rm"
    label: str
    server: Server
    upstream: UpstreamPath

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def has_blob(self, digest: str) -> bool:
        if isinstance(self.server, (Mirror, NginxCache)):
            return self.server.has_blob(digest)
        return self.server.blob_data_path(digest).is_file()

    def blob_url(self, name: str, digest: str) -> str:
        return f"{self.url}/v2/{name}/blobs/{digest}"


class _TLSRegistry(UpstreamRegistry):
    """distribution with ``http.tls``: its URL is https, readiness checked with the CA."""

    @property
    def url(self) -> str:
        return super().url.replace("http://", "https://")


@dataclass
class TLSSides:
    """regmirror, nginx and the distribution proxy, each over TLS with a certificate
    from one test CA, on the same upstream paths as the plain-HTTP sides."""

    ca_path: Path
    dist: Side
    nginx: Side
    rm: Side

    @property
    def sides(self) -> tuple[Side, Side, Side]:
        return self.dist, self.nginx, self.rm

    def stop(self) -> None:
        for side in (self.rm, self.nginx, self.dist):
            try:
                side.server.stop()
            except Exception as e:
                print(f"bench: could not stop {side.label}: {e!r}", flush=True)


def _dist_proxy_config(remote: str) -> dict[str, Any]:
    return {
        "proxy": {"remoteurl": remote},
        # No per-request logging on any side (regmirror.access_log: false, nginx
        # access_log off).
        "log": {
            "level": "warn",
            "accesslog": {"disabled": True},
            "fields": {"service": "distribution-proxy"},
        },
    }


@dataclass
class BenchEnv:
    base_dir: Path
    regmirror_extra: Mapping[str, Any] = field(default_factory=dict)
    tag_freshness: str = "30s"
    nginx_workers: int = NGINX_WORKERS
    upstream: UpstreamRegistry | None = None
    direct: SpliceProxy | None = None
    # The asyncio proxy every side went through before (scenario 3 shows its cost).
    direct_old: CountingProxy | None = None
    dist: Side | None = None
    nginx: Side | None = None
    rm: Side | None = None
    _paths: list[UpstreamPath] = field(default_factory=list)

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self.upstream = UpstreamRegistry(self.base_dir / "upstream")
        self.upstream.start()
        self.direct = SpliceProxy.to_url(self.upstream.url)
        self._paths.append(self.direct)
        self.direct.start()
        self.direct_old = CountingProxy.to_url(self.upstream.url)
        self.direct_old.start()
        dist_path = self._path("dist")
        dist = UpstreamRegistry(
            self.base_dir / "distribution", extra_config=_dist_proxy_config(dist_path.url)
        )
        self.dist = Side("dist", "distribution proxy", dist, dist_path)
        dist.start()
        nginx_path = self._path("nginx")
        nginx = NginxCache(
            self.base_dir / "nginx",
            nginx_path.url,
            workers=self.nginx_workers,
            tag_valid=self.tag_freshness,
        )
        self.nginx = Side("nginx", "nginx", nginx, nginx_path)
        nginx.start()
        rm_path = self._path("rm")
        extra = deep_merge({"regmirror": {"access_log": False}}, self.regmirror_extra)
        mirror = Mirror(
            self.base_dir / "regmirror",
            rm_path.url,
            tag_freshness=self.tag_freshness,
            log_level="info",
            extra=extra,
        )
        self.rm = Side("rm", "regmirror", mirror, rm_path)
        mirror.start()

    def _path(self, key: str) -> CountedUpstream:
        assert self.upstream is not None
        path = CountedUpstream(
            self.base_dir / f"upstream-{key}", self.upstream.root, name=f"upstream-{key}"
        )
        self._paths.append(path)
        path.start()
        return path

    def start_tls(self) -> TLSSides:
        """Start a TLS regmirror, a TLS nginx and a TLS distribution proxy, fresh
        stores each."""
        import ssl

        assert self.dist is not None and self.rm is not None and self.nginx is not None
        base = self.base_dir / "tls"
        ca = CA("bench CA")
        ca_path = ca.write(base / "ca.crt")
        cert = ca.issue("bench").write(base, "server")
        tls = {"certificate": str(cert.cert_path), "key": str(cert.key_path)}
        context = ssl.create_default_context(cafile=str(ca_path))
        dist = _TLSRegistry(
            base / "distribution",
            extra_config={
                "proxy": {"remoteurl": self.dist.upstream.url},
                "http": {"tls": tls},
                "log": {
                    "level": "warn",
                    "accesslog": {"disabled": True},
                    "fields": {"service": "distribution-proxy-tls"},
                },
            },
        )
        dist.ssl_context = context
        dist.start()
        dist_side = Side("dist", "distribution proxy (TLS)", dist, self.dist.upstream)
        nginx = NginxCache(
            base / "nginx",
            self.nginx.upstream.url,
            workers=self.nginx_workers,
            tag_valid=self.tag_freshness,
            tls_cert=cert.cert_path,
            tls_key=cert.key_path,
            ssl_context=context,
        )
        try:
            nginx.start()
        except BaseException:
            dist.stop()
            raise
        nginx_side = Side("nginx", "nginx (TLS)", nginx, self.nginx.upstream)
        mirror = Mirror(
            base / "regmirror",
            self.rm.upstream.url,
            tag_freshness=self.tag_freshness,
            log_level="info",
            extra=deep_merge(
                {"regmirror": {"access_log": False}, "http": {"tls": tls}}, self.regmirror_extra
            ),
            ssl_context=context,
        )
        try:
            mirror.start()
        except BaseException:
            nginx.stop()
            dist.stop()
            raise
        rm_side = Side("rm", "regmirror (TLS)", mirror, self.rm.upstream)
        return TLSSides(ca_path, dist_side, nginx_side, rm_side)

    def stop(self) -> None:
        servers: list[Any] = [s.server for s in (self.rm, self.nginx, self.dist) if s is not None]
        for server in [*servers, self.upstream]:
            if server is not None:
                try:
                    server.stop()
                except Exception as e:  # stop the rest regardless
                    print(f"bench: could not stop {server}: {e!r}", flush=True)
        if self.direct_old is not None:
            self.direct_old.stop()
        for path in self._paths:
            try:
                path.stop()
            except Exception as e:
                print(f"bench: could not stop {path}: {e!r}", flush=True)

    @property
    def sides(self) -> tuple[Side, Side, Side]:
        assert self.dist is not None and self.nginx is not None and self.rm is not None
        return self.dist, self.nginx, self.rm

    @property
    def mirror(self) -> Mirror:
        assert self.rm is not None and isinstance(self.rm.server, Mirror)
        return self.rm.server

    # --- servers started by a scenario, beside the main ones ---------------------------

    def fresh_path(self, fleet: Fleet, rate: float | None = None) -> UpstreamPath:
        """The counted way to the upstream of a server a scenario starts itself,
        stopped with ``fleet``: a door of its own (no proxy in the path), or with
        ``rate`` (bytes/s) a counting proxy capped at that rate."""
        assert self.upstream is not None
        if rate is None:
            n = next(_DOORS)
            door = CountedUpstream(
                self.base_dir / f"door-{n}", self.upstream.root, name=f"door-{n}"
            )
            fleet.start(door)
            return door
        proxy = fleet.proxy(self.upstream.url)
        proxy.set_rate_limit(rate)
        return proxy

    def fresh_mirror(
        self,
        fleet: Fleet,
        base: Path,
        extra: Mapping[str, Any],
        path: UpstreamPath | None = None,
    ) -> Side:
        """A new regmirror with its own store and counting path (by default a new
        proxy), stopped with ``fleet``: ``--regmirror-config`` applies, what the
        scenario sets in ``extra`` wins."""
        path = path or self.fresh_path(fleet)
        config = deep_merge({"regmirror": {"access_log": False}}, self.regmirror_extra)
        mirror = Mirror(
            base,
            path.url,
            tag_freshness=self.tag_freshness,
            log_level="info",
            extra=deep_merge(config, extra),
            ready_timeout=60.0,
        )
        fleet.start(mirror)
        return Side("rm", "regmirror", mirror, path)

    def fresh_nginx(
        self, fleet: Fleet, base: Path, workers: int, path: UpstreamPath | None = None
    ) -> Side:
        """A new nginx with ``workers`` worker processes, its own cache and path."""
        path = path or self.fresh_path(fleet)
        nginx = NginxCache(base, path.url, workers=workers, tag_valid=self.tag_freshness)
        fleet.start(nginx)
        return Side("nginx", "nginx", nginx, path)

    def fresh_distribution(
        self, fleet: Fleet, base: Path, path: UpstreamPath | None = None
    ) -> Side:
        """A new distribution proxy with its own storage and path."""
        path = path or self.fresh_path(fleet)
        dist = UpstreamRegistry(base, extra_config=_dist_proxy_config(path.url))
        fleet.start(dist)
        return Side("dist", "distribution proxy", dist, path)

    # --- content ---------------------------------------------------------------------

    def push_image(self, image: Image) -> None:
        assert self.upstream is not None
        with RegistryPusher(self.upstream.url, timeout=300) as pusher:
            pusher.push_image(image)

    def push_blob(self, blob: Blob, name: str = BLOB_REPO) -> None:
        assert self.upstream is not None
        with RegistryPusher(self.upstream.url, timeout=300) as pusher:
            pusher.push_blob(name, blob, skip_existing=False)

    def wait_stored(self, side: Side, digests: Iterable[str], timeout: float = 120.0) -> None:
        """Wait until ``side`` has committed every blob to its store, and its upstream
        traffic has stopped (distribution stores a proxied blob in the background, with
        a second upstream fetch)."""
        wanted = list(digests)
        poll_until(
            lambda: all(side.has_blob(d) for d in wanted),
            timeout,
            interval=0.05,
            what=f"{side.label} to store {len(wanted)} blob(s)",
        )
        wait_quiet(side.upstream, timeout=timeout)

    # --- logs ------------------------------------------------------------------------

    def regmirror_problems(self) -> list[str]:
        """Warnings, errors and tracebacks in regmirror's log."""
        return log_problems(self.mirror.log_text())

    def nginx_problems(self) -> list[str]:
        """Lines of nginx's error log at level error or above."""
        assert self.nginx is not None and isinstance(self.nginx.server, NginxCache)
        text = self.nginx.server.log_text()
        return [
            line for line in text.splitlines() if re.search(r"\[(error|crit|alert|emerg)\]", line)
        ]

    def distribution_problems(self) -> list[str]:
        assert self.dist is not None
        text = self.dist.server.log_text()
        return [
            line
            for line in text.splitlines()
            if re.search(r"level=(error|fatal|panic)", line)
            and "response completed with error" not in line
        ]


def cluster_connected(mirror: Mirror) -> bool:
    """Whether regmirror reports its Redis connection up (``workers`` > 1, a cluster)."""
    from tests.support.rawhttp import request

    text = request(mirror.url, "GET", "/metrics").body.decode()
    return "regmirror_cluster_connected 1" in text


def log_problems(text: str) -> list[str]:
    """Lines of a twistd log at level warn or above (``[namespace#error]``), plus
    tracebacks (``Traceback`` and the lines that follow it, up to the exception)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.search(r"#(warn|error|critical)\]", line) or "Unhandled" in line:
            out.append(line)
        elif "Traceback (most recent call last)" in line:
            block = [line]
            i += 1
            while i < len(lines) and (lines[i].startswith((" ", "\t")) or "\t" in lines[i][:40]):
                block.append(lines[i])
                i += 1
            if i < len(lines):
                block.append(lines[i])
            out.append("\n".join(block))
        i += 1
    return out


@dataclass
class Fleet:
    """Servers and proxies a scenario started, stopped in reverse order by PID."""

    servers: list[Any] = field(default_factory=list)

    def start(self, server: Any) -> Any:
        self.servers.append(server)
        server.start()
        return server

    def proxy(self, url: str) -> SpliceProxy:
        proxy: SpliceProxy = self.start(SpliceProxy.to_url(url))
        return proxy

    def stop(self) -> None:
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception as e:
                print(f"bench: could not stop {server}: {e!r}", flush=True)


def wait_quiet(path: UpstreamPath, quiet: float = 0.5, timeout: float = 120.0) -> None:
    """Wait until no byte came from the upstream along ``path`` for ``quiet`` seconds
    (a ``CountedUpstream``: and nothing was in flight)."""
    if isinstance(path, CountedUpstream):
        path.wait_quiet(quiet, timeout)
        return
    proxy = path
    deadline = time.monotonic() + timeout
    last, since = proxy.bytes_down, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = proxy.bytes_down
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise TimeoutError(f"upstream traffic through {proxy.url} did not stop in {timeout:g}s")


class TransferWatch:
    """Notes when ``size`` more bytes than at the start have come along ``proxy``:
    the moment one full copy of a blob has arrived from upstream (a
    ``CountedUpstream`` counts a response when it ends: the same moment)."""

    def __init__(self, proxy: UpstreamPath, size: int, interval: float = 0.005) -> None:
        self.proxy = proxy
        self.size = size
        self.interval = interval
        self.done_at: float | None = None
        self._start = proxy.bytes_down
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.proxy.bytes_down - self._start >= self.size:
                self.done_at = time.monotonic()
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> TransferWatch:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="transfer")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# --- memory ------------------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """``pid`` and its descendants (workers, a coordinator)."""
    return [pid, *descendants(pid)]


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (``echo 5 > /proc/PID/clear_refs``, Linux ≥ 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssMonitor:
    """Peak resident memory of a process tree while a ``with`` block runs.

    Samples the VmRSS of every process of the tree every ``interval`` s: ``peak_kib``
    is the largest sum, ``peak_process_kib`` the largest single process (a worker, an
    nginx worker). It also reads the main process's VmHWM (reset at the start) and
    counts it in both: a short spike between two samples still shows up in VmHWM.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.peak_process_kib = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        pids = _descendants(self.pid)
        refresh = time.monotonic() + 1.0
        while not self._stop.is_set():
            if time.monotonic() > refresh:
                pids, refresh = _descendants(self.pid), time.monotonic() + 1.0
            each = [_status_kib(p, "VmRSS") or 0 for p in pids]
            self.peak_kib = max(self.peak_kib, sum(each))
            self.peak_process_kib = max(self.peak_process_kib, *each)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssMonitor:
        reset_peak_rss(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True, name="rss")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        hwm = _status_kib(self.pid, "VmHWM")
        if hwm is not None:
            self.peak_kib = max(self.peak_kib, hwm)
            self.peak_process_kib = max(self.peak_process_kib, hwm)

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024

    @property
    def peak_process_mib(self) -> float:
        return self.peak_process_kib / 1024


def tree_rss_kib(pid: int) -> tuple[int, int]:
    """VmRSS now of ``pid``'s tree: (the sum, the largest single process)."""
    each = [_status_kib(p, "VmRSS") or 0 for p in _descendants(pid)]
    return sum(each), max(each, default=0)


@contextmanager
def rss_monitors(sides: Iterable[Side]) -> Iterator[dict[str, RssMonitor]]:
    """One ``RssMonitor`` per side (keyed by ``side.key``)."""
    monitors = {}
    for side in sides:
        assert side.pid is not None
        monitors[side.key] = RssMonitor(side.pid)
    for m in monitors.values():
        m.__enter__()
    try:
        yield monitors
    finally:
        for m in monitors.values():
            m.__exit__(None, None, None)
