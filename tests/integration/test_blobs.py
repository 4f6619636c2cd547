"""Blob fetches through regmirror: single-flight, verification, disconnecting clients."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.images import Blob, random_bytes
from tests.support.mirror import Mirror
from tests.support.ports import LOOPBACK
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import connect, request
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

MiB = 1024 * 1024
FreshBlob = Callable[[int], tuple[str, Blob]]


@dataclass
class Transfer:
    """What a client got: the status and headers if they arrived, the body bytes read,
    and the exception that ended the transfer early (``None``: complete)."""

    status: int | None = None
    headers: http.client.HTTPMessage | None = None
    size: int = 0
    sha256: str = ""
    body: bytes = field(default=b"", repr=False)
    error: BaseException | None = None

    @property
    def complete(self) -> bool:
        return self.error is None


def get_streaming(base_url: str, target: str, *, keep_body: bool = False) -> Transfer:
    """GET ``target`` and hash the body as it streams in (20 x 32 MiB stay out of RAM)."""
    out = Transfer()
    conn = connect(base_url, timeout=120)
    digest = hashlib.sha256()
    chunks = []
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        out.status, out.headers = resp.status, resp.headers
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            out.size += len(chunk)
            if keep_body:
                chunks.append(chunk)
    except (http.client.HTTPException, OSError) as e:
        out.error = e
    finally:
        conn.close()
    out.sha256 = "sha256:" + digest.hexdigest()
    out.body = b"".join(chunks)
    return out


def test_concurrent_gets_of_uncached_32mb_blob_fetch_upstream_once(
    mirror: Mirror,
    upstream: UpstreamRegistry,
    upstream_proxy: CountingProxy,
    fresh_blob: FreshBlob,
) -> None:
    name, blob = fresh_blob(32 * MiB)
    target = f"/v2/{name}/blobs/{blob.digest}"
    clients = 20
    barrier = threading.Barrier(clients)
    results: list[Transfer | BaseException | None] = [None] * clients

    def client(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = get_streaming(mirror.url, target)
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "clients still reading after 180 s"

    for i, result in enumerate(results):
        assert isinstance(result, Transfer), f"client {i}: {result!r}"
        assert result.complete, f"client {i}: transfer broken: {result.error!r}"
        assert result.status == 200, f"client {i}: {result.status}"
        assert result.headers is not None
        assert result.headers.get("Content-Length") in (None, str(blob.size))
        assert (result.size, result.sha256) == (blob.size, blob.digest), f"client {i}"

    # One fetch went upstream, seen when it was sent (proxy) and when it ended (log).
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
    upstream.wait_for_requests("GET", target, at_least=1)
    assert upstream.count_requests("GET", target) == 1
    assert upstream_proxy.bytes_down < 2 * blob.size
    poll_until(lambda: mirror.has_blob(blob.digest), 30, what="the blob in the mirror's store")
    assert mirror.blob_sha256(blob.digest) == blob.digest


def test_corrupted_upstream_blob_is_not_cached_and_client_sees_broken_transfer(
    mirror: Mirror,
    upstream: UpstreamRegistry,
    upstream_proxy: CountingProxy,
    fresh_blob: FreshBlob,
) -> None:
    name, blob = fresh_blob(2 * MiB)
    target = f"/v2/{name}/blobs/{blob.digest}"
    data_path = upstream.blob_data_path(blob.digest)
    assert data_path.read_bytes() == blob.data
    wrong = random_bytes(blob.seed + "/corrupted", blob.size)
    data_path.write_bytes(wrong)  # same length: upstream still announces the right size

    got = get_streaming(mirror.url, target, keep_body=True)

    if got.complete:
        # Only acceptable if the mirror verified before answering: an error, not the blob.
        assert got.status is not None and got.status >= 500, (
            f"mirror sent a complete {got.status} response with {got.size} bytes "
            f"({got.sha256}) for a blob whose upstream bytes do not match {blob.digest}"
        )
        assert json.loads(got.body).get("errors"), got.body[:500]
    else:
        assert isinstance(
            got.error,
            http.client.IncompleteRead | http.client.RemoteDisconnected | ConnectionError,
        ), f"unexpected failure: {got.error!r}"
        assert got.status in (None, 200)
        assert got.size < blob.size or got.sha256 != blob.digest
    fetches_after_first_get = upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}")
    assert fetches_after_first_get >= 1

    poll_until(
        lambda: not mirror.tmp_files(),
        10,
        what="the mirror's _tmp to be empty after the failed fetch",
        describe=lambda: f"_tmp holds {mirror.tmp_files()}",
    )
    assert not mirror.has_blob(blob.digest)
    assert not [p for p in (mirror.root / "blobs").rglob(f"*{blob.hex}*") if p.is_file()]

    # Upstream repaired: the mirror must go upstream again, not remember the failure.
    data_path.write_bytes(blob.data)
    again = get_streaming(mirror.url, target)
    assert again.complete, f"second GET broken: {again.error!r}"
    assert (again.status, again.size, again.sha256) == (200, blob.size, blob.digest)
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") > fetches_after_first_get
    poll_until(lambda: mirror.has_blob(blob.digest), 10, what="the repaired blob in the store")
    assert mirror.blob_sha256(blob.digest) == blob.digest


def test_client_disconnecting_halfway_still_caches_the_blob(
    mirror: Mirror, upstream_proxy: CountingProxy, fresh_blob: FreshBlob
) -> None:
    name, blob = fresh_blob(32 * MiB)
    target = f"/v2/{name}/blobs/{blob.digest}"
    # Freeze the upstream download at 3/4, so it is certainly still running when the
    # client (which reads 1/2) goes away.
    upstream_proxy.hold_downstream_after(blob.size * 3 // 4)

    sock = socket.create_connection((LOOPBACK, mirror.port), timeout=60)
    try:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {mirror.host}\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the response head: {buf!r}"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        chunked = b"transfer-encoding: chunked" in head.lower()
        received = len(body)
        prefix = body
        while received < blob.size // 2:
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection closed after {received} body bytes"
            received += len(chunk)
            if len(prefix) < 1 << 20:
                prefix += chunk
        if not chunked:
            assert prefix == blob.data[: len(prefix)]
    finally:
        sock.close()

    poll_until(
        lambda: upstream_proxy.holding,
        30,
        what="the upstream download to reach the hold point "
        "(did the mirror cancel its fetch when the client went away?)",
        describe=mirror.log_tail,
    )
    assert not mirror.has_blob(blob.digest), "blob complete although upstream is held"
    upstream_proxy.release()

    poll_until(
        lambda: mirror.has_blob(blob.digest),
        60,
        what="the mirror to finish the fetch the client abandoned",
        describe=mirror.log_tail,
    )
    assert mirror.blob_sha256(blob.digest) == blob.digest
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
    poll_until(lambda: not mirror.tmp_files(), 10, what="the mirror's _tmp to be empty")
    # And it is served from the store now.
    resp = request(mirror.url, "GET", target, timeout=60)
    assert resp.status == 200 and hashlib.sha256(resp.body).hexdigest() == blob.hex
    assert upstream_proxy.count_requests("GET", f"/blobs/{blob.digest}") == 1
