"""The fast path for cached manifests (regmirror.http.fastpath) in a real twistd: two
mirrors of the session upstream, one with ``regmirror.fast_path: false``; every request
gets the same bytes from both (``Date`` aside), skopeo pulls through the fast one, and
its metrics show the fast path answered."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import running_mirror
from tests.support.images import ACCEPT_MANIFESTS, Image
from tests.support.mirror import Mirror
from tests.support.rawhttp import request
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CLOSE = b"GET /v2/ HTTP/1.0\r\n\r\n"  # answered, then the connection is closed


@pytest.fixture(scope="module")
def twins(
    upstream: UpstreamRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mirror, Mirror]]:
    with (
        running_mirror(tmp_path_factory.mktemp("fast"), upstream.url) as fast,
        running_mirror(
            tmp_path_factory.mktemp("full"), upstream.url, extra={"regmirror": {"fast_path": False}}
        ) as full,
    ):
        yield fast, full


def exchange(mirror: Mirror, data: bytes) -> bytes:
    """``data`` and a closing request on one connection; everything the mirror sent
    back, ``Date`` blanked."""
    with socket.create_connection((mirror.listen_ip, mirror.port), timeout=30) as s:
        s.sendall(data + CLOSE)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", b"".join(chunks))


def fast_hits(mirror: Mirror) -> float:
    metrics = request(mirror.url, "GET", "/metrics").body.decode()
    return sum(
        float(v)
        for v in re.findall(r"^regmirror_manifest_fast_hits_total\{.*\} (\S+)$", metrics, re.M)
    )


def head(method: str, target: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    return (
        "\r\n".join([f"{method} {target} {version}", "Host: mirror", *headers]) + "\r\n\r\n"
    ).encode()


def test_every_request_gets_the_bytes_of_the_full_path(
    twins: tuple[Mirror, Mirror], images: dict[str, Image], upstream: UpstreamRegistry
) -> None:
    fast, full = twins
    image = images["oci"]
    for mirror in twins:
        got = request(
            mirror.url,
            "GET",
            f"/v2/{image.name}/manifests/{image.tag}",
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        assert got.status == 200
    accept = f"Accept: {ACCEPT_MANIFESTS}"
    by_tag = f"/v2/{image.name}/manifests/{image.tag}"
    by_digest = f"/v2/{image.name}/manifests/{image.digest}"
    keep_alive = "Connection: Keep-Alive"
    upstream_name = upstream.url.removeprefix("http://")
    cases = {
        "GET by digest": head("GET", by_digest, accept),
        "HEAD by digest": head("HEAD", by_digest, accept),
        "GET by tag": head("GET", by_tag, accept),
        "HEAD by tag, HTTP/1.0 keep-alive": head(
            "HEAD", by_tag, accept, keep_alive, version="HTTP/1.0"
        ),
        "GET by tag, HTTP/1.0 keep-alive": head(
            "GET", by_tag, accept, keep_alive, version="HTTP/1.0"
        ),
        "no Accept": head("GET", by_digest),
        "wrong Accept": head("GET", by_digest, f"Accept: {DOCKER_V2}"),
        "?ns= of the upstream": head("GET", f"{by_tag}?ns={upstream_name}", accept),
        "?ns= of another registry": head("GET", f"{by_tag}?ns=elsewhere.example", accept),
        "unknown tag": head("GET", f"/v2/{image.name}/manifests/no-such-tag", accept),
        "If-None-Match": head("GET", by_digest, accept, f'If-None-Match: "{image.digest}"'),
        "pipelined": head("GET", by_digest, accept) * 3
        + head("GET", by_digest, f"Accept: {DOCKER_V2}")
        + head("HEAD", by_tag, accept) * 2,
    }
    before = fast_hits(fast)
    for name, data in cases.items():
        answer = exchange(fast, data)
        assert answer == exchange(full, data), name
        assert answer.endswith(b"{}"), name  # every answer came, the closing one last
    # the hits, up to the first one it leaves to the full path (pipelined: 3 of 6)
    assert fast_hits(fast) - before == 10
    assert fast_hits(full) == 0


def test_skopeo_pulls_through_the_fast_path(
    twins: tuple[Mirror, Mirror], images: dict[str, Image], tmp_path: Path
) -> None:
    fast, _ = twins
    image = images["index"]
    skopeo_copy(image.ref(fast.host), tmp_path / "first", all_platforms=True)
    verify_dir(tmp_path / "first", image)
    before = fast_hits(fast)
    skopeo_copy(image.ref(fast.host), tmp_path / "again", all_platforms=True)
    check = verify_dir(tmp_path / "again", image)
    assert check.blob_digests == {b.digest for b in image.blobs()}
    poll_until(lambda: fast_hits(fast) > before, timeout=10, what="fast path hits counted")
