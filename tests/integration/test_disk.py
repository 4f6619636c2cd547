"""The cache looks after its own disk: quota, expiry, and recovery from kill -9."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
from pathlib import Path

from tests.integration.conftest import MakeMirror
from tests.support.images import Image, docker_image, push_image
from tests.support.mirror import Mirror
from tests.support.proxy import CountingProxy
from tests.support.rawhttp import connect
from tests.support.skopeo import skopeo_copy, verify_dir
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

MB = 1_000_000


def store_bytes(mirror: Mirror) -> int:
    total = 0
    for dirpath, _, files in os.walk(mirror.root / "blobs"):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def pull(mirror: Mirror, image: Image, dest: Path) -> None:
    skopeo_copy(image.ref(mirror.host), dest)
    verify_dir(dest, image)


def test_quota_keeps_the_store_under_the_low_watermark_and_the_newest_image(
    upstream: UpstreamRegistry, make_mirror: MakeMirror, tmp_path: Path
) -> None:
    # Five images of ~2 MB each into a 5 MB quota: evict above 4.5 MB, down to 3 MB.
    images = [
        push_image(
            upstream.url, docker_image(f"quota/img{i}", "v1", layer_sizes=(1_000_000, 900_000))
        )
        for i in range(5)
    ]
    max_size = 5 * MB
    mirror = make_mirror(
        upstream.url,
        extra={"regmirror": {"max_size": max_size, "high_watermark": 0.9, "low_watermark": 0.6}},
    )
    high, low = 0.9 * max_size, 0.6 * max_size
    for i, image in enumerate(images):
        pull(mirror, image, tmp_path / f"pull{i}")
        poll_until(
            lambda: store_bytes(mirror) <= high,
            10,
            what="the store under its high watermark",
            describe=lambda: f"{store_bytes(mirror)} bytes",
        )
        # The image just pulled is the one still cached, complete. (A client may have its
        # last byte, verified, a moment before the fsync and rename are done: poll.)
        for blob in image.blobs():
            poll_until(
                lambda b=blob: mirror.has_blob(b.digest),
                10,
                what=f"the newest image's blob {blob.digest} in the store",
            )
    evictions = re.findall(r"quota: evicted \d+ entries; (\d+) bytes in use", mirror.log_text())
    assert evictions, "5 images of 2 MB in a 5 MB quota must evict"
    assert all(int(usage) <= low for usage in evictions), evictions
    assert not mirror.has_blob(images[0].manifest.layers[0].digest)  # the oldest went first
    # An evicted image pulls through again.
    pull(mirror, images[0], tmp_path / "again")


def test_content_expires_after_the_ttl_and_is_fetched_again(
    upstream: UpstreamRegistry,
    upstream_proxy: CountingProxy,
    make_mirror: MakeMirror,
    tmp_path: Path,
) -> None:
    image = push_image(upstream.url, docker_image("ttl/img", "v1", layer_sizes=(300_000,)))
    mirror = make_mirror(
        upstream_proxy.url,
        extra={"proxy": {"ttl": "2s"}, "regmirror": {"reaper_interval": "0.2s"}},
    )
    pull(mirror, image, tmp_path / "first")
    layer = image.manifest.layers[0].digest
    assert mirror.has_blob(layer)
    fetched = upstream_proxy.count_requests("GET", f"/blobs/{layer}")
    assert fetched == 1
    poll_until(lambda: not mirror.has_blob(layer), 15, what="the layer to expire")
    poll_until(
        lambda: not list((mirror.root / "repositories").rglob("_tags/*.json")),
        10,
        what="the expired manifest's tag links to go",
    )
    assert not mirror.has_blob(image.manifest.digest)
    pull(mirror, image, tmp_path / "second")
    assert upstream_proxy.count_requests("GET", f"/blobs/{layer}") == 2


def test_kill_9_during_concurrent_fetches_loses_nothing_verified_and_serves_nothing_else(
    upstream: UpstreamRegistry,
    upstream_proxy: CountingProxy,
    make_mirror: MakeMirror,
    tmp_path: Path,
) -> None:
    image = push_image(
        upstream.url,
        docker_image("crash/img", "v1", layer_sizes=(8_000_000, 8_000_000, 8_000_000, 300_000)),
    )
    mirror = make_mirror(upstream_proxy.url)
    small = image.manifest.layers[-1]
    conn = connect(mirror.url)
    conn.request("GET", f"/v2/{image.name}/blobs/{small.digest}")
    assert conn.getresponse().read() == small.data
    poll_until(lambda: mirror.has_blob(small.digest), 10, what="the small layer committed")
    # Freeze the big downloads mid-way, with several fetches in flight, then kill -9.
    upstream_proxy.hold_downstream_after(upstream_proxy.bytes_down + 5_000_000)

    def get(digest: str) -> int:
        c = connect(mirror.url, timeout=30)
        try:
            c.request("GET", f"/v2/{image.name}/blobs/{digest}")
            response = c.getresponse()
            return len(response.read())
        except Exception:
            return -1

    big = [layer.digest for layer in image.manifest.layers[:3]]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(get, d) for d in big]
        poll_until(lambda: len(mirror.tmp_files()) >= 1, 15, what="fetches in flight")
        mirror.kill9()
        upstream_proxy.release()
        results = [f.result(timeout=60) for f in futures]
    assert all(r != 8_000_000 for r in results), results  # nobody got a complete body
    leftovers = mirror.tmp_files()
    assert leftovers, "a fetch should have been in flight when killed"
    mirror.start()  # same store
    assert mirror.tmp_files() == []  # swept at start-up
    for digest in big:
        assert not mirror.has_blob(digest)
    assert mirror.blob_sha256(small.digest) == small.digest  # verified content survived
    pull(mirror, image, tmp_path / "after")
    for layer in image.manifest.layers:
        with open(mirror.blob_path(layer.digest), "rb") as f:
            assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == layer.digest
