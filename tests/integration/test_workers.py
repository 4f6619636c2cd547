"""``regmirror.workers: 2``: one twistd, two worker processes on one listener, one cache.

The workers are told apart by the ``Server`` header of their responses
(``... worker/N``). Without ``regmirror.cluster.redis`` the parent starts a private
redis-server for them (Debian's ``redis-server``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import ssl
import threading
from collections.abc import Callable

import pytest

from tests.support.certs import CA
from tests.support.images import Blob
from tests.support.mirror import Mirror
from tests.support.process import alive, cmdline, descendants, require_tool
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import connect, request
from tests.support.redis import RedisServer
from tests.support.wait import poll_until

MiB = 1024 * 1024
FreshBlob = Callable[[int], tuple[str, Blob]]
WORKERS = {"regmirror": {"workers": 2}}


def worker_of(resp: http.client.HTTPResponse) -> int:
    match = re.search(r"worker/(\d+)", resp.headers.get("Server", ""))
    assert match, f"no worker in the Server header: {resp.headers.get('Server')!r}"
    return int(match.group(1))


def connections_per_worker(
    mirror: Mirror, each: int, timeout: float = 30.0
) -> dict[int, list[http.client.HTTPConnection]]:
    """Open connections until ``each`` of them are served by each of the two workers
    (the kernel spreads new connections over the workers' sockets); every kept one has
    answered ``GET /metrics`` with its worker joined to the coordinator."""
    kept: dict[int, list[http.client.HTTPConnection]] = {1: [], 2: []}

    def more() -> bool:
        conn = connect(mirror.url, timeout=30)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        worker = worker_of(resp)
        joined = re.search(r"^regmirror_cluster_connected 1", body, re.M) is not None
        if joined and len(kept[worker]) < each:
            kept[worker].append(conn)
        else:
            conn.close()
        return all(len(c) == each for c in kept.values())

    poll_until(more, timeout, interval=0.05, what=f"{each} connections to each worker")
    return kept


def worker_pids(mirror: Mirror) -> dict[int, int]:
    """Worker index -> pid, from twistd's children's command lines."""
    assert mirror.pid is not None
    out = {}
    for pid in descendants(mirror.pid):
        argv = cmdline(pid)
        if "regmirror.app.worker" in argv and "--index" in argv and alive(pid):
            out[int(argv[argv.index("--index") + 1])] = pid
    return out


@pytest.fixture
def workers(upstream_proxy: CountingProxy, make_mirror: Callable[..., Mirror]) -> Mirror:
    require_tool("redis-server")
    # A short lease: a fetch whose worker died is taken over within 3 s.
    extra = {"regmirror": {"workers": 2, "cluster": {"lease": "3s"}}}
    mirror = make_mirror(upstream_proxy.url, extra=extra)
    poll_until(lambda: len(worker_pids(mirror)) == 2, 20, what="two workers")
    return mirror


def get_blob(conn: http.client.HTTPConnection, target: str) -> tuple[int, int, str, int]:
    """GET on ``conn``: (status, worker, sha256 of the body, bytes); raises if cut."""
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        digest, size = hashlib.sha256(), 0
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        if resp.length:  # http.client: bytes announced but never received
            raise http.client.IncompleteRead(b"", resp.length)
        return resp.status, worker_of(resp), "sha256:" + digest.hexdigest(), size
    finally:
        conn.close()


Result = tuple[int, int, str, int] | BaseException | None


def get_on_each(
    conns: list[http.client.HTTPConnection], target: str, *, together: bool
) -> list[Result]:
    """``get_blob`` on each connection in a thread of its own (``together``: released
    at once); what each got, or what it raised."""
    barrier = threading.Barrier(len(conns))
    results: list[Result] = [None] * len(conns)

    def client(i: int) -> None:
        try:
            if together:
                barrier.wait(30)
            results[i] = get_blob(conns[i], target)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "clients still reading after 120 s"
    return results


def fetching_workers(mirror: Mirror) -> list[int]:
    """The workers whose temporary directory holds a file (a fetch in flight)."""
    found = []
    for directory in mirror.tmp_dir.glob("*-w*"):
        if directory.is_dir() and any(p.is_file() for p in directory.iterdir()):
            found.append(int(directory.name.rpartition("-w")[2]))
    return found


def test_two_workers_serve_one_listener_and_fetch_a_cold_blob_upstream_once(
    workers: Mirror, upstream_proxy: CountingProxy, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(16 * MiB)
    # Throttled: the transfer takes ~2 s, so the clients of both workers overlap it.
    upstream_proxy.set_rate_limit(8 * MiB)
    kept = connections_per_worker(workers, each=4)
    conns = [c for worker in (1, 2) for c in kept[worker]]
    results = get_on_each(conns, f"/v2/{name}/blobs/{blob.digest}", together=True)

    served_by = []
    for i, result in enumerate(results):
        assert isinstance(result, tuple), f"client {i}: {result!r}"
        status, worker, digest, size = result
        assert (status, digest, size) == (200, blob.digest, blob.size), f"client {i}"
        served_by.append(worker)
    assert sorted(served_by) == [1, 1, 1, 1, 2, 2, 2, 2]
    # One upstream fetch for the eight clients of both workers.
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
    assert upstream_proxy.bytes_down < 2 * blob.size
    poll_until(lambda: workers.has_blob(blob.digest), 30, what="the blob in the store")
    assert workers.blob_sha256(blob.digest) == blob.digest


def test_a_worker_killed_mid_fetch_is_replaced_and_no_client_gets_a_wrong_body(
    workers: Mirror, upstream_proxy: CountingProxy, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(12 * MiB)
    target = f"/v2/{name}/blobs/{blob.digest}"
    upstream_proxy.set_rate_limit(2 * MiB)  # ~6 s: time to kill the fetching worker
    conns = [c for cs in connections_per_worker(workers, each=2).values() for c in cs]
    outcome: list[list[Result]] = []
    clients = threading.Thread(
        target=lambda: outcome.append(get_on_each(conns, target, together=False))
    )
    clients.start()
    [holder] = poll_until(lambda: fetching_workers(workers), 20, what="a worker fetching")
    poll_until(lambda: upstream_proxy.bytes_down > blob.size // 4, 30, what="a quarter fetched")
    pids = worker_pids(workers)
    os.kill(pids[holder], signal.SIGKILL)
    clients.join(150)
    upstream_proxy.set_rate_limit(None)
    [results] = outcome
    for result in results:  # cut, or complete and right: never complete and wrong
        if isinstance(result, tuple) and result[3] == blob.size:
            assert result[2] == blob.digest
    # The worker is started again (under the same replica name) and both serve it.
    poll_until(
        lambda: worker_pids(workers).get(holder) not in (None, pids[holder]),
        30,
        what=f"worker {holder} started again",
    )
    again = [c for cs in connections_per_worker(workers, each=2).values() for c in cs]
    for conn in again:
        status, _worker, digest, size = get_blob(conn, target)
        assert (status, digest, size) == (200, blob.digest, blob.size)
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") <= 2
    poll_until(lambda: workers.has_blob(blob.digest), 20, what="the blob in the store")


def test_workers_join_a_configured_cluster_and_start_no_redis_of_their_own(
    upstream_proxy: CountingProxy,
    make_mirror: Callable[..., Mirror],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    try:
        extra = {"regmirror": {"workers": 2, "cluster": {"redis": redis.url, "name": "edge"}}}
        mirror = make_mirror(upstream_proxy.url, extra=extra)
        poll_until(lambda: len(worker_pids(mirror)) == 2, 20, what="two workers")
        assert mirror.pid is not None
        names = [" ".join(cmdline(pid)) for pid in descendants(mirror.pid)]
        assert not any("redis-server" in n for n in names), names
        connections_per_worker(mirror, each=1)  # both serve, joined to that Redis
        assert "coordinated by regmirror.cluster.redis" in mirror.log_text()
        mirror.stop()
    finally:
        redis.stop()


def test_a_worker_that_dies_is_started_again(workers: Mirror) -> None:
    before = worker_pids(workers)
    assert workers.pid is not None
    # Without TLS or htpasswd a worker has nothing to reload: SIGHUP, passed on by the
    # parent, must not end it (worker 2's pid is checked below).
    os.kill(workers.pid, signal.SIGHUP)
    os.kill(before[1], signal.SIGKILL)

    def replaced() -> bool:
        now = worker_pids(workers)
        return now.get(1) not in (None, before[1]) and now.get(2) == before[2]

    poll_until(replaced, 30, what="worker 1 started again")
    assert re.search(
        rf"worker 1 \(pid {before[1]}\) exited \(signal SIGKILL\).*starting it again",
        workers.log_text(),
    )
    connections_per_worker(workers, each=1)  # both serve again


def test_sighup_reloads_tls_in_every_worker_and_stops_none(
    upstream_proxy: CountingProxy, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = tmp_path_factory.mktemp("tls")
    ca = CA("workers CA")
    context = ssl.create_default_context(cafile=str(ca.write(base / "ca.crt")))
    cert = ca.issue("127.0.0.1").write(base, "server")
    tls = {"certificate": str(cert.cert_path), "key": str(cert.key_path)}
    mirror = Mirror(
        base / "mirror",
        upstream_proxy.url,
        extra={"http": {"tls": tls}, **WORKERS},
        ssl_context=context,
    )
    mirror.start()
    seen: set[str] = set()

    def both() -> bool:
        resp = request(mirror.url, "GET", "/v2/", ssl_context=context)
        assert resp.status == 200
        seen.add(re.search(r"worker/(\d)", resp.header("Server") or "")[1])  # type: ignore[index]
        return seen == {"1", "2"}

    try:
        poll_until(both, 20, what="both workers answering over TLS")
        before = worker_pids(mirror)
        assert mirror.pid is not None
        os.kill(mirror.pid, signal.SIGHUP)
        reloaded = re.compile(r"\[w([12])/regmirror\.http\.tls#info\] SIGHUP: reloading")
        poll_until(
            lambda: set(reloaded.findall(mirror.log_text())) == {"1", "2"},
            20,
            what="both workers reloading their TLS files",
        )
        assert worker_pids(mirror) == before
        seen.clear()
        poll_until(both, 20, what="both workers answering over TLS after the reload")
    finally:
        mirror.stop()


def test_sigterm_to_twistd_stops_every_worker_and_the_coordinator(workers: Mirror) -> None:
    assert workers.pid is not None
    children = descendants(workers.pid)
    names = " ".join(" ".join(cmdline(pid)) for pid in children)
    assert names.count("regmirror.app.worker") == 2 and "redis-server" in names, names
    # twistd ends by the signal it was stopped with, once its services have stopped
    # (it would be SIGKILL, -9, had it not stopped within the timeout).
    assert workers.stop(timeout=30) == -signal.SIGTERM
    assert [pid for pid in children if alive(pid)] == []


def test_workers_and_coordinator_stop_when_twistd_is_killed(workers: Mirror) -> None:
    assert workers.pid is not None
    children = descendants(workers.pid)
    assert len(children) >= 3, children
    workers.kill9()
    poll_until(
        lambda: not any(alive(pid) for pid in children),
        20,
        what="the workers and redis-server to exit after twistd was killed",
    )
