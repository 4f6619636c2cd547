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
import threading
from collections.abc import Callable

import pytest

from tests.support.images import Blob
from tests.support.mirror import Mirror
from tests.support.process import alive, cmdline, descendants, require_tool
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import connect
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
    mirror = make_mirror(upstream_proxy.url, extra=WORKERS)
    poll_until(lambda: len(worker_pids(mirror)) == 2, 20, what="two workers")
    return mirror


def test_two_workers_serve_one_listener_and_fetch_a_cold_blob_upstream_once(
    workers: Mirror, upstream_proxy: CountingProxy, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(16 * MiB)
    # Throttled: the transfer takes ~2 s, so the clients of both workers overlap it.
    upstream_proxy.set_rate_limit(8 * MiB)
    kept = connections_per_worker(workers, each=4)
    conns = [c for worker in (1, 2) for c in kept[worker]]
    barrier = threading.Barrier(len(conns))
    results: list[tuple[int, int, str, int] | BaseException | None] = [None] * len(conns)

    def client(i: int) -> None:
        conn = conns[i]
        try:
            barrier.wait(30)
            conn.request("GET", f"/v2/{name}/blobs/{blob.digest}")
            resp = conn.getresponse()
            digest, size = hashlib.sha256(), 0
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            results[i] = (resp.status, worker_of(resp), "sha256:" + digest.hexdigest(), size)
        except BaseException as e:
            results[i] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "clients still reading after 120 s"

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


def test_a_worker_that_dies_is_started_again(workers: Mirror) -> None:
    before = worker_pids(workers)
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
