"""The benchmark's machinery checked against the real upstream, without regmirror.

bench/ measures regmirror beside nginx ``proxy_cache`` and the distribution proxy,
each reaching the upstream through a ``SpliceProxy`` that counts its bytes and
requests. These tests check that those parts do what the numbers assume: the proxy
counts exactly what went through and forwards it unchanged (also capped), nginx is
configured as a cache (a second GET does not reach the upstream, concurrent misses
share one upstream fetch), and the report computes its ratios and verdicts against
the right peer. They never look at a clock: benchmarks are not tests.
Run them with ``pytest tests/integration/test_harness_bench.py``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.report import PEERS, Row, Target, all_of, render_markdown, rm_at_least
from tests.support.countedupstream import CountedUpstream
from tests.support.images import ACCEPT_MANIFESTS, Image, make_blob, push_blob
from tests.support.nginx import NginxCache
from tests.support.ports import free_port
from tests.support.process import descendants
from tests.support.proxy import SpliceProxy
from tests.support.rawhttp import connect, request
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

# --- SpliceProxy -------------------------------------------------------------------------


def test_splice_proxy_counts_bytes_and_requests_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["index"]
    with SpliceProxy.to_url(upstream.url) as proxy:
        skopeo_copy(image.ref(proxy.host), tmp_path / "d", all_platforms=True)
        verify_dir(tmp_path / "d", image)
        for blob in image.blobs():
            assert proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
        for child in image.manifest.children:
            assert proxy.count_requests("GET", f"/manifests/{child.digest}") == 1
        total = sum(b.size for b in image.blobs())
        assert total <= proxy.bytes_down < total + 200_000
        assert proxy.bytes_up > 0
        assert proxy.connections >= 1
        manifest_get = next(r for r in proxy.requests if r.target.endswith("/manifests/latest"))
        assert "application/vnd.oci.image.index.v1+json" in manifest_get.headers["accept"]
    assert proxy.active_connections == 0


def test_splice_proxy_forwards_a_large_blob_unchanged_and_capped_upstream_directly(
    upstream: UpstreamRegistry,
) -> None:
    blob = make_blob("harness/splice-large", 12_000_000)
    push_blob(upstream.url, "harness/splice", blob)
    path = f"/v2/harness/splice/blobs/{blob.digest}"
    with SpliceProxy.to_url(upstream.url) as proxy:
        for rate in (None, 40_000_000.0):
            proxy.set_rate_limit(rate)
            before = proxy.bytes_down
            resp = request(proxy.url, "GET", path, timeout=60)
            assert resp.status == 200
            assert hashlib.sha256(resp.body).hexdigest() == blob.hex
            # The body and the response head, nothing else, nothing twice.
            assert blob.size < proxy.bytes_down - before < blob.size + 4096
        assert proxy.count_requests("GET", blob.digest) == 2


def test_splice_proxy_keeps_a_connection_alive_and_stops_with_it_open_upstream_directly(
    upstream: UpstreamRegistry, images: dict[str, Image]
) -> None:
    blob = images["oci"].manifest.layers[0]
    proxy = SpliceProxy.to_url(upstream.url)
    proxy.start()
    try:
        conn = connect(proxy.url, timeout=30)
        for _ in range(3):  # one connection, three requests (keep-alive through the pipe)
            conn.request("GET", f"/v2/{images['oci'].name}/blobs/{blob.digest}")
            body = conn.getresponse().read()
            assert body == blob.data
        assert proxy.connections == 1
        assert proxy.count_requests("GET", blob.digest) == 3
        poll_until(lambda: proxy.active_connections == 1, 5, what="one open connection")
    finally:
        proxy.stop()  # with the connection still open: shuts it down, joins the threads
    assert proxy.active_connections == 0
    with pytest.raises(OSError):
        conn.request("GET", "/v2/")
        conn.getresponse()
    conn.close()


def test_splice_proxy_refused_upstream_closes_client_upstream_directly() -> None:
    with SpliceProxy("127.0.0.1", free_port()) as proxy:
        with pytest.raises((ConnectionError, OSError)):
            request(proxy.url, "GET", "/v2/", timeout=5)
        poll_until(lambda: proxy.failed_connects == 1, 5, what="a failed upstream connect")


# --- CountedUpstream ---------------------------------------------------------------------


@pytest.fixture
def counted(upstream: UpstreamRegistry, tmp_path: Path) -> Iterator[CountedUpstream]:
    with CountedUpstream(tmp_path / "counted", upstream.root) as path:
        yield path


def test_counted_upstream_counts_what_a_pull_fetched_upstream_directly(
    counted: CountedUpstream, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["index"]
    skopeo_copy(image.ref(counted.host), tmp_path / "d", all_platforms=True)
    verify_dir(tmp_path / "d", image)
    counted.wait_quiet(quiet=0.2, timeout=30)
    for blob in image.blobs():
        assert counted.count_requests("GET", f"/blobs/{blob.digest}") == 1
    for child in image.manifest.children:
        assert counted.count_requests("GET", f"/manifests/{child.digest}") == 1
    blobs = sum(b.size for b in image.blobs())
    manifests = sum(m.size for m in image.manifests())
    # Body bytes only: the blobs, the manifests, small JSON answers (/v2/, errors).
    assert blobs + manifests <= counted.bytes_down < blobs + manifests + 2_000


def test_counted_upstream_sees_a_transfer_in_flight_upstream_directly(
    counted: CountedUpstream, upstream: UpstreamRegistry
) -> None:
    blob = make_blob("harness/counted-flight", 48_000_000)
    push_blob(upstream.url, "harness/counted", blob)
    before = counted.bytes_down
    conn = connect(counted.url, timeout=30)
    conn.request("GET", f"/v2/harness/counted/blobs/{blob.digest}")
    resp = conn.getresponse()
    first = resp.read(1000)  # the rest waits in socket buffers: the registry is mid-write
    assert counted.in_flight() == 1
    assert counted.bytes_down == before  # counted when the response ends
    body = first + resp.read()
    conn.close()
    assert hashlib.sha256(body).hexdigest() == blob.hex
    counted.wait_quiet(quiet=0.2, timeout=30)
    assert counted.in_flight() == 0
    assert counted.bytes_down - before == blob.size
    assert counted.count_requests("GET", blob.digest) == 1


def test_counted_upstream_refuses_writes_to_the_shared_storage_upstream_directly(
    counted: CountedUpstream,
) -> None:
    resp = request(counted.url, "POST", "/v2/harness/counted/blobs/uploads/")
    assert resp.status == 405  # maintenance.readonly: nothing is written there


# --- nginx proxy_cache ---------------------------------------------------------------------


@pytest.fixture
def nginx_cache(
    upstream: UpstreamRegistry, tmp_path: Path
) -> Iterator[tuple[NginxCache, SpliceProxy]]:
    proxy = SpliceProxy.to_url(upstream.url)
    proxy.start()
    nginx = NginxCache(tmp_path / "nginx", proxy.url, workers=2)
    try:
        nginx.start()
        yield nginx, proxy
    finally:
        nginx.stop()
        proxy.stop()


def test_nginx_peer_serves_cached_manifests_and_blobs_upstream_directly(
    nginx_cache: tuple[NginxCache, SpliceProxy], images: dict[str, Image]
) -> None:
    nginx, proxy = nginx_cache
    assert nginx.pid is not None and len(descendants(nginx.pid)) >= 2  # master + 2 workers
    assert "worker_processes 2;" in nginx.config_path.read_text()
    image = images["oci"]
    accept = {"Accept": ACCEPT_MANIFESTS}
    for ref in (image.digest, image.tag):
        path = f"/v2/{image.name}/manifests/{ref}"
        answers = [request(nginx.url, method, path, headers=accept) for method in ("GET",) * 3]
        answers.append(request(nginx.url, "HEAD", path, headers=accept))
        for resp in answers:
            assert resp.status == 200
            assert resp.header("Docker-Content-Digest") == image.digest
        assert all(resp.body == image.manifest.data for resp in answers[:3])
        assert [r.header("X-Cache-Status") for r in answers] == ["MISS", "HIT", "HIT", "HIT"]
        assert proxy.count_requests(path_substring=f"/manifests/{ref}") == 1
    blob = image.manifest.layers[0]
    path = f"/v2/{image.name}/blobs/{blob.digest}"
    for _ in range(2):
        resp = request(nginx.url, "GET", path)
        assert resp.status == 200 and resp.body == blob.data
    assert proxy.count_requests("GET", blob.digest) == 1
    assert nginx.has_blob(blob.digest) and nginx.has_blob(blob.digest, image.name)
    assert not nginx.has_blob(image.manifest.layers[1].digest)


def _established_to(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local end is 127.0.0.1:``port``."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "01":
            count += 1
    return count


def test_nginx_peer_concurrent_misses_share_one_upstream_fetch_upstream_directly(
    nginx_cache: tuple[NginxCache, SpliceProxy], upstream: UpstreamRegistry
) -> None:
    nginx, proxy = nginx_cache
    blob = make_blob("harness/nginx-lock", 3_000_000)
    push_blob(upstream.url, "harness/nginx", blob)
    before = proxy.bytes_down
    bodies: list[bytes] = []
    errors: list[BaseException] = []
    path = f"/v2/harness/nginx/blobs/{blob.digest}"

    def get() -> None:
        try:
            resp = request(nginx.url, "GET", path, timeout=60)
            assert resp.status == 200
            bodies.append(resp.body)
        except BaseException as e:
            errors.append(e)

    # Slow the upstream to a trickle until every client is connected and the first
    # fetch is under way: the others then wait on nginx's cache lock.
    proxy.set_rate_limit(1_000_000.0)
    threads = [threading.Thread(target=get) for _ in range(6)]
    for t in threads:
        t.start()
    poll_until(
        lambda: _established_to(nginx.port) >= 6 and proxy.count_requests("GET", blob.digest),
        20,
        what="six clients connected to nginx and one upstream fetch started",
    )
    proxy.set_rate_limit(None)
    for t in threads:
        t.join(120)
    assert not errors
    assert len(bodies) == 6 and all(hashlib.sha256(b).hexdigest() == blob.hex for b in bodies)
    assert proxy.count_requests("GET", blob.digest) == 1
    assert blob.size <= proxy.bytes_down - before < blob.size + 4096


def test_nginx_peer_stops_with_its_workers(tmp_path: Path, upstream: UpstreamRegistry) -> None:
    nginx = NginxCache(tmp_path / "nginx", upstream.url, workers=1)
    nginx.start()
    assert nginx.pid is not None
    workers = descendants(nginx.pid)
    assert workers
    assert nginx.stop() == 0
    assert not nginx.running
    poll_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
        10,
        what="nginx's workers to exit",
    )


# --- the report --------------------------------------------------------------------------


def test_report_gives_ratios_against_both_peers_and_checks_the_named_one() -> None:
    target = Target(
        "≥ 1.0x distribution and ≥ 0.4x nginx",
        all_of(rm_at_least(1.0), rm_at_least(0.4, "nginx")),
    )
    met = Row("s", "requests/s", dist=100.0, rm=450.0, nginx=1000.0, target=target)
    missed = Row("s", "requests/s", dist=100.0, rm=350.0, nginx=1000.0, target=target)
    unknown = Row("s", "requests/s", dist=100.0, rm=350.0, target=target)
    assert met.cells()[2:] == [
        "100.00",
        "1,000.00",
        "450.00",
        "4.50x",
        "0.45x",
        "≥ 1.0x distribution and ≥ 0.4x nginx: met",
    ]
    assert missed.cells()[-1].endswith(": MISSED")
    assert unknown.cells()[3] == "—" and unknown.cells()[6] == ""
    assert unknown.cells()[-1].endswith("(n/a)")
    pair = Row("w", "requests/s", dist=10.0, rm=30.0, columns=("workers: 1", "workers: 2", "2/1"))
    assert pair.cells()[2:5] == ["10.00", "30.00", "3.00x"]
    text = render_markdown([met, pair])
    assert "| " + " | ".join(["scenario", "metric", *PEERS, "target"]) + " |" in text
    assert "| scenario | metric | workers: 1 | workers: 2 | 2/1 | target |" in text


# --- the benchmark's world ---------------------------------------------------------------


def test_bench_env_counts_each_sides_upstream_traffic_on_its_own(
    tmp_path: Path, integration_tools: dict[str, str]
) -> None:
    from bench.env import BenchEnv, random_blob

    env = BenchEnv(tmp_path / "servers")
    try:
        env.start()
        blob = random_blob("harness/bench-env", 3_000_000)
        env.push_blob(blob)
        for side in env.sides:
            before = {s.key: s.upstream.bytes_down for s in env.sides}
            for _ in range(2):  # cold, then (once stored) cached
                resp = request(side.url, "GET", f"/v2/bench/blobs/blobs/{blob.digest}")
                assert resp.status == 200 and resp.body == blob.data, side.label
                env.wait_stored(side, [blob.digest], timeout=60)
            copies = (side.upstream.bytes_down - before[side.key]) / blob.size
            # distribution stores a proxied blob with a second fetch of its own; the
            # rest is small JSON (a /v2/ check: a few bytes).
            assert round(copies, 3) == (2.0 if side.key == "dist" else 1.0), side.label
            for other in env.sides:
                if other is not side:
                    assert other.upstream.bytes_down == before[other.key], other.label
    finally:
        env.stop()
    assert not any(s.server.running for s in (env.dist, env.nginx, env.rm) if s is not None)
